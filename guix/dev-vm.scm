;; guix/dev-vm.scm -- the Guix System that runs inside the qbuf dev VM.
;;
;; How qbuf-qemu builds it
;; -----------------------
;; `qbuf-qemu build' runs, from the qbuf checkout:
;;
;;   QBUF_QEMU_SSH_PUBKEY="ssh-ed25519 AAAA... qbuf-qemu" \
;;   guix time-machine -C guix/channels.scm -- \
;;     system image -t qcow2 --image-size=20G --root=LINK /abs/path/guix/dev-vm.scm
;;
;; * guix/channels.scm pins the Guix revision, so everyone gets the same VM.
;; * QBUF_QEMU_SSH_PUBKEY is the one-line OpenSSH public key of the key pair
;;   qbuf-qemu generated for you; it becomes the only way to log in (user
;;   `dev', over SSH).  Without it this file refuses to evaluate.
;; * --root=LINK makes LINK a symlink to the resulting qcow2 image in the
;;   store and registers it as a garbage-collector root.  Store items are
;;   read-only: the VM must run on a writable copy of the image or on a
;;   qcow2 overlay backed by it.
;;
;; qbuf-qemu then boots the image with QEMU: the qbuf checkout is shared with
;; mount tag "qbuf" over virtio-fs (a vhost-user-fs-pci device served by
;; virtiofsd) or, when no virtiofsd is available, over virtio-9p; each boot
;; has exactly one of the two, and the `qbuf-share' service below mounts
;; whichever it is at /mnt/qbuf.  The serial port is the console; the QEMU
;; guest agent listens on the virtio-serial port org.qemu.guest_agent.0; QMP
;; `system_powerdown' (ACPI power button) shuts the guest down cleanly; a
;; kernel panic reaches QEMU through its pvpanic device (GUEST_PANICKED).
;;
;; How to customize
;; ----------------
;; * To add a tool (compiler, library, editor...), add its package name to
;;   guix/manifest.scm -- not here -- and run `qbuf-qemu build' again.
;; * System-level changes (services, users, kernel arguments) go below.
;;
;; Every record field, service type and module used here was checked against
;; Guix's own source (the 2025 versions of the files, the year of the pinned
;; 1.5.0 release); the file a non-obvious fact comes from is named next to it.

(use-modules (gnu)                      ;operating-system, file-system, ...
             (gnu services dbus)        ;dbus-root-service-type, polkit-service-type
             (gnu services desktop)     ;elogind-service-type
             (gnu services networking)  ;dhcpcd-service-type
             (gnu services shepherd)    ;shepherd-service, user-processes-...
             (gnu services ssh)         ;openssh-service-type
             (gnu services virtualization) ;qemu-guest-agent-service-type
             (gnu packages bash)        ;bash, the login shell of 'dev'
             (guix packages)            ;package?, package-name
             (guix profiles)            ;manifest-entries & co.
             (srfi srfi-1)              ;remove
             (srfi srfi-34)             ;raise
             (srfi srfi-35))            ;condition, &message

(define (qbuf-error text)
  ;; Abort evaluation of this file.  'guix system' loads configuration files
  ;; with 'load*' (guix/ui.scm), whose 'report-load-error' prints a
  ;; &message condition as a single clean line:
  ;;   guix system: error: TEXT
  (raise (condition (&message (message text)))))


;;;
;;; Packages: the toolchain from manifest.scm, next to this file.
;;;

(define %qbuf-guix-directory
  ;; The directory holding this file, independent of the caller's working
  ;; directory.  'guix system' loads the file with
  ;; (load (canonicalize-path FILE)) (guix/ui.scm, 'load*'), so
  ;; (current-filename) is this file's absolute name.  It is #f only when the
  ;; code is not read from a file (e.g. pasted into a REPL).
  (let ((file (current-filename)))
    (if file
        (dirname file)
        (qbuf-error "dev-vm.scm: cannot find its own directory; \
pass the file name of dev-vm.scm to 'guix system'"))))

(define %qbuf-manifest
  ;; 'load' returns the value of the file's last expression: the manifest.
  (load (string-append %qbuf-guix-directory "/manifest.scm")))

(define %qbuf-manifest-packages
  ;; (PACKAGE OUTPUT) lists: a form the 'packages' field accepts
  ;; (gnu/system.scm: "list of (PACKAGE OUTPUT...) or just PACKAGE").
  (map (lambda (entry)
         (list (manifest-entry-item entry) (manifest-entry-output entry)))
       (manifest-entries %qbuf-manifest)))

(define %qbuf-manifest-names
  (map manifest-entry-name (manifest-entries %qbuf-manifest)))

(define (in-qbuf-manifest? thing)
  ;; True when THING, an element of %base-packages, names a package that the
  ;; manifest already provides.  Dropping those avoids two manifest entries
  ;; with the same name but different store items (a profile collision
  ;; error) if the manifest ever resolves to another version than
  ;; %base-packages.
  (let ((pkg (if (pair? thing) (car thing) thing)))
    (and (package? pkg)
         (member (package-name pkg) %qbuf-manifest-names)
         #t)))


;;;
;;; Login: user 'dev', SSH key only.
;;;

(define %qbuf-ssh-public-key
  (let ((key (getenv "QBUF_QEMU_SSH_PUBKEY")))
    (if (and key (not (string-null? (string-trim-both key))))
        (plain-file "qbuf-qemu.pub"
                    (string-append (string-trim-both key) "\n"))
        (qbuf-error "QBUF_QEMU_SSH_PUBKEY is not set: \
build the image with 'qbuf-qemu build'"))))

(define %qbuf-dev-uid
  ;; The host user's uid, when qbuf-qemu passes it (QBUF_QEMU_DEV_UID, set
  ;; for host uids of 1000 and up).  The share shows the guest the host's
  ;; owners and modes (9p with security_model=none, and virtio-fs, whose
  ;; virtiofsd reports host uids as they are unless told to map them), so
  ;; 'dev' can write the checkout in /mnt/qbuf only with the host user's
  ;; uid, and what it writes there belongs to that user.  #f lets Guix
  ;; choose (the 'uid' field of <user-account>, gnu/system/accounts.scm,
  ;; defaults to #f).
  (let ((uid (getenv "QBUF_QEMU_DEV_UID")))
    (and uid (string->number uid))))

(define %qbuf-sudoers
  ;; %sudoers-specification is a plain-file in gnu/system.scm ("root" and
  ;; "%wheel" may do anything, with a password); 'plain-file-content' is
  ;; exported by guix/gexp.scm.  Guix checks the result with 'visudo --check'
  ;; when building the system.
  (plain-file "sudoers"
              (string-append (plain-file-content %sudoers-specification)
                             "dev ALL=(ALL) NOPASSWD: ALL\n")))


;;;
;;; The share: tag "qbuf" at /mnt/qbuf, over virtio-fs or 9p.
;;;

;; Why a service of its own and not two <file-system> entries: Guix makes
;; one Shepherd service per <file-system>, named after the mount point
;; ('file-system->shepherd-service-name' in gnu/services/base.scm:
;; file-system-/mnt/qbuf), and refuses a system in which two services
;; provide the same name ('assert-valid-graph' in gnu/services/shepherd.scm:
;; "service '~a' provided more than once").  A <file-system> has a single
;; 'type', so one entry cannot try virtiofs and then 9p either.  Hence no
;; <file-system> for /mnt/qbuf at all (do not add one: it would be mounted
;; on top of this one), and this one service instead, which mounts the
;; share over whichever transport this boot has.

(define %qbuf-share-tag "qbuf")
(define %qbuf-share-mount-point "/mnt/qbuf")
(define %qbuf-share-9p-options
  ;; The options qbuf-qemu itself uses to mount 9p shares in the guest.
  "trans=virtio,version=9p2000.L,msize=262144")

(define %qbuf-share-shepherd-service
  (shepherd-service
   (documentation "Mount the qbuf checkout at /mnt/qbuf (virtio-fs or 9p).")
   (provision '(qbuf-share))
   ;; What the <file-system> services require (gnu/services/base.scm).
   (requirement '(root-file-system udev))
   ;; Runs in PID 1.  'mount', 'umount' (guix/build/syscalls.scm; 'mount'
   ;; takes SOURCE TARGET TYPE [FLAGS [OPTIONS]] and raises 'system-error')
   ;; and 'mkdir-p' (guix/build/utils.scm) come with %default-modules
   ;; (gnu/services/shepherd.scm).  At most one of the two devices exists:
   ;; virtio-fs is tried first, and mounting a tag that no device of that
   ;; type carries fails at once (Linux logs "virtio-fs: tag <qbuf> not
   ;; found" and returns EINVAL, fs/fuse/virtio_fs.c; 9p logs "no channels
   ;; available for device qbuf", net/9p/trans_virtio.c), so the other
   ;; transport is tried next.  The kernel modules of both are loaded by
   ;; the initrd (see 'initrd-modules' below).
   ;;
   ;; The service starts even when neither mount works (a VM booted
   ;; without a share, as 'mount-may-fail? #t' used to allow): it only
   ;; says so in the Shepherd's log.  It must never fail, because
   ;; 'user-processes' waits for it (see qbuf-share-service-type).
   (start #~(lambda _
              (define (mount-share type options)
                (catch 'system-error
                  (lambda ()
                    (mount #$%qbuf-share-tag #$%qbuf-share-mount-point
                           type 0 options)
                    (format #t "qbuf share mounted at ~a over ~a~%"
                            #$%qbuf-share-mount-point type)
                    #t)
                  (lambda args
                    (format #t "qbuf share: no ~a mount (~a)~%"
                            type (strerror (system-error-errno args)))
                    #f)))

              (mkdir-p #$%qbuf-share-mount-point)
              (or (mount-share "virtiofs" #f)
                  (mount-share "9p" #$%qbuf-share-9p-options)
                  (format #t "qbuf share: nothing mounted at ~a~%"
                          #$%qbuf-share-mount-point))
              #t))
   ;; Like the <file-system> services' 'stop' with 'mount-may-fail?': leave
   ;; the mount point (PID 1 must not keep it busy), unmount, ignore errors
   ;; (nothing mounted).  Returning #f means "stopped".
   (stop #~(lambda _
             (chdir "/")
             (catch 'system-error
               (lambda () (umount #$%qbuf-share-mount-point))
               (const #f))
             #f))
   (respawn? #f)))

(define qbuf-share-service-type
  ;; Extending 'user-processes' with 'qbuf-share' is what
  ;; 'file-system-service-type' does with its 'file-systems' target
  ;; (gnu/services/base.scm): services that run user code start only once
  ;; the share is mounted, and at shutdown the share is unmounted only after
  ;; every user process was killed.  <service-type> fields from
  ;; gnu/services.scm.
  (service-type
   (name 'qbuf-share)
   (extensions
    (list (service-extension shepherd-root-service-type
                             (const (list %qbuf-share-shepherd-service)))
          (service-extension user-processes-service-type
                             (const '(qbuf-share)))))
   (default-value #f)
   (description "Mount the qbuf checkout shared by QEMU (tag \"qbuf\") at
/mnt/qbuf, over virtio-fs or 9p, whichever the VM has.")))


;;;
;;; Services.
;;;

(define %qbuf-services
  (list
   ;; SSH on port 22, keys only.  Fields from <openssh-configuration> in
   ;; gnu/services/ssh.scm; 'authorized-keys' is a list of
   ;; (USER-NAME FILE-LIKE ...) lists, copied to /etc/ssh/authorized_keys.d.
   (service openssh-service-type
            (openssh-configuration
             (port-number 22)
             (permit-root-login #f)
             (password-authentication? #f)
             (authorized-keys `(("dev" ,%qbuf-ssh-public-key)))))

   ;; DHCP on QEMU's user-mode NIC.  'dhcpcd-service-type' is in
   ;; gnu/services/networking.scm (added in 2025, before the 1.5.0 release)
   ;; and is preferred to the older isc-dhcp based 'dhcp-client-service-type',
   ;; which is on its way out.  Its default <dhcpcd-configuration> has an
   ;; empty 'interfaces' list, meaning every Ethernet interface dhcpcd finds,
   ;; and its Shepherd service provides 'networking.
   (service dhcpcd-service-type)

   ;; QEMU guest agent, so qbuf-qemu can query and shut down the guest.
   ;; <qemu-guest-agent-configuration> (gnu/services/virtualization.scm) has
   ;; the fields 'qemu' and 'device'; an empty 'device' means qemu-ga's
   ;; built-in default, spelled out here: the virtio-serial port named
   ;; org.qemu.guest_agent.0.  The virtio_console driver behind it is in
   ;; %base-initrd-modules.
   (service qemu-guest-agent-service-type
            (qemu-guest-agent-configuration
             (device "/dev/virtio-ports/org.qemu.guest_agent.0")))

   ;; ACPI power button => clean power-off, so QMP 'system_powerdown' works.
   ;; A bare Guix System ignores the button: nothing in %base-services
   ;; handles it, and Guix has no acpid service (no acpid-service-type in
   ;; gnu/services/).  elogind is Guix's answer, the one %desktop-services
   ;; uses: gnu/services/desktop.scm starts it from the Shepherd at boot
   ;; "so that it can handle events like lid close" (no desktop or login
   ;; session needed), adds elogind's udev rules to udev (they tag power-switch
   ;; input devices such as the ACPI power button for elogind), and
   ;; <elogind-configuration> 'handle-power-key' defaults to 'poweroff; it is
   ;; set explicitly anyway.  elogind needs the system bus (its Shepherd
   ;; service requires 'dbus-system) and extends polkit; both would be
   ;; instantiated from their default values (gnu/services/dbus.scm) and are
   ;; listed for clarity.
   (service dbus-root-service-type)
   (service polkit-service-type)
   (service elogind-service-type
            (elogind-configuration
             (handle-power-key 'poweroff)))

   ;; The qbuf checkout at /mnt/qbuf (see above).
   (service qbuf-share-service-type)))

(define %qbuf-base-services
  ;; %base-services (gnu/services/base.scm) already contains what a headless
  ;; VM needs, including an agetty with (tty #f): it runs on the serial
  ;; console named by the "console=ttyS0,..." kernel argument below, so no
  ;; extra getty is declared.  None of %qbuf-services is in %base-services,
  ;; so nothing is duplicated; only the message of the day changes.
  (modify-services %base-services
    (login-service-type config =>
                        (login-configuration
                         (inherit config)
                         (motd (plain-file "motd" "\
This is the qbuf dev VM (Guix System).
The qbuf checkout is mounted at /mnt/qbuf.
Add tools in guix/manifest.scm, then run 'qbuf-qemu build'.\n\n"))))))


;;;
;;; The operating system.
;;;

(operating-system
  (host-name "qbuf-dev")
  (timezone "Etc/UTC")
  (locale "en_US.utf8")

  ;; No hardware firmware in a VM (default: %base-firmware; Guix's own
  ;; gnu/system/examples/vm-image.tmpl does the same).
  (firmware '())

  ;; Serial console on ttyS0 (QEMU's first serial port), plus the VGA
  ;; console; the last console= is /dev/console.  %default-kernel-arguments
  ;; (gnu/system.scm) is kept.
  (kernel-arguments (append %default-kernel-arguments
                            (list "console=tty0" "console=ttyS0,115200")))

  ;; BIOS GRUB.  For a qcow2 image, 'guix system image' writes GRUB into the
  ;; image itself ('install-grub-disk-image', gnu/bootloader/grub.scm), so
  ;; 'targets' is only used when reconfiguring from inside the VM, where the
  ;; disk is virtio /dev/vda.  'terminal-outputs', 'terminal-inputs',
  ;; 'serial-unit' and 'serial-speed' are <bootloader-configuration> fields
  ;; (gnu/bootloader.scm) and turn into "serial --unit=0 --speed=115200" and
  ;; "terminal_output serial console" in grub.cfg.
  (bootloader (bootloader-configuration
               (bootloader grub-bootloader)
               (targets '("/dev/vda"))
               (terminal-outputs '(serial console))
               (terminal-inputs '(serial console))
               (serial-unit 0)
               (serial-speed 115200)))

  ;; Kernel modules loaded from the initrd, so they are there before the
  ;; Shepherd starts any service.  %base-initrd-modules
  ;; (gnu/system/linux-initrd.scm) already has virtio_pci, virtio_blk (for
  ;; /dev/vda), virtio_net and virtio_console (guest agent port); they are
  ;; listed again to make the requirement explicit (duplicates removed).
  ;; * The share (qbuf-share-service-type): "virtiofs" (fs/fuse/Makefile in
  ;;   Linux: CONFIG_VIRTIO_FS builds virtiofs.ko; Guix's 6.17 x86_64 config,
  ;;   gnu/packages/aux-files/linux-libre/6.17-x86_64.conf, has
  ;;   CONFIG_VIRTIO_FS=m and CONFIG_FUSE_FS=y), and "9p" and "9pnet_virtio"
  ;;   (CONFIG_9P_FS=m there).  Guix adds file system modules by itself only
  ;;   for file systems needed at boot ('file-system-modules', which knows
  ;;   9p but not virtiofs), and /mnt/qbuf is not one.
  ;; * Panics: QEMU's ISA "pvpanic" device is the ACPI device QEMU0001, which
  ;;   the pvpanic-mmio driver binds (drivers/misc/pvpanic/pvpanic-mmio.c:
  ;;   acpi_device_id "QEMU0001").  The same config has CONFIG_PVPANIC=y (the
  ;;   shared core, built in) and CONFIG_PVPANIC_MMIO=m (6.18's too), so
  ;;   "pvpanic-mmio" is listed; it reports a panic to QEMU, which emits
  ;;   GUEST_PANICKED.  (pvpanic-pci would be for QEMU's pvpanic-pci device,
  ;;   which qbuf-qemu does not use.)
  ;; Built-in modules among these are harmless: the initrd builder drops
  ;; what modules.builtin lists ('flat-linux-module-directory' in
  ;; gnu/system/linux-initrd.scm) and the boot code skips names that have
  ;; no .ko file ('load-linux-modules-from-directory' in
  ;; gnu/build/linux-modules.scm).  Hyphens and underscores are equivalent
  ;; ('find-module-file', same file).
  (initrd-modules (delete-duplicates
                   (append (list "virtio_pci" "virtio_blk" "virtio_console"
                                 "virtiofs" "9p" "9pnet_virtio"
                                 "pvpanic-mmio")
                           %base-initrd-modules)))

  (file-systems
   (cons* (file-system
            ;; 'guix system image -t qcow2' makes an MBR disk with an ESP and
            ;; an ext4 root partition labelled "Guix_image" (root-partition
            ;; and root-label in gnu/system/image.scm).  While building the
            ;; image, Guix swaps this entry for one naming the root partition
            ;; by UUID ('operating-system-for-image'); the label is what a
            ;; 'guix system reconfigure' run inside the VM will use.
            (device (file-system-label "Guix_image"))
            (mount-point "/")
            (type "ext4"))
          ;; No entry for /mnt/qbuf: qbuf-share-service-type mounts it.
          %base-file-systems))

  ;; 'kvm' and the other groups are all in %base-groups
  ;; (gnu/system/shadow.scm).  No 'password' field: it defaults to #f, which
  ;; gnu/build/accounts.scm writes to /etc/shadow as "!" (locked), so there
  ;; is no password login; SSH public-key login still works because sshd
  ;; uses PAM (openssh-configuration 'use-pam?' defaults to #t).
  (users (cons (user-account
                (name "dev")
                (uid %qbuf-dev-uid)
                (comment "qbuf developer")
                (group "users")
                (supplementary-groups '("wheel" "netdev" "audio" "video" "kvm"))
                (home-directory "/home/dev")
                (shell (file-append bash "/bin/bash")))
               %base-user-accounts))

  (sudoers-file %qbuf-sudoers)

  (packages (append %qbuf-manifest-packages
                    (remove in-qbuf-manifest? %base-packages)))

  (services (append %qbuf-services %qbuf-base-services)))
