;; guix/manifest.scm -- the qbuf C++ contributor toolchain.
;;
;; This one list is used twice:
;;
;;   * guix/dev-vm.scm loads it and installs every package in the VM's system
;;     profile, so they are on PATH for every user of the qbuf dev VM;
;;   * it also works on its own, on any machine that has Guix:
;;
;;       guix time-machine -C guix/channels.scm -- shell -m guix/manifest.scm
;;       guix shell -m guix/manifest.scm          # with your current Guix
;;
;; To add a tool: append its Guix package name below (find names with
;; `guix search WORD'; "name@version" and "name:output" work too), then run
;; `qbuf-qemu build' to get an image that contains it.
;;
;; Every name below was checked against the package definitions of the pinned
;; Guix (gnu/packages/*.scm): e.g. "gcc-toolchain" is made by
;; make-gcc-toolchain in commencement.scm, "make" is gnu-make in base.scm,
;; "clang" is clang-from-llvm in llvm.scm, "valgrind" is the visible
;; valgrind/interactive in valgrind.scm, "pkg-config" is %pkg-config in
;; pkg-config.scm.
(use-modules (gnu packages))            ;specifications->manifest

(specifications->manifest
 (list
  ;; Compilers, build systems, build helpers.
  "gcc-toolchain"                       ;gcc, g++, ld, glibc headers
  "clang"                               ;clang, clang++ (propagates llvm)
  "cmake"
  "ninja"
  "make"
  "pkg-config"
  "ccache"

  ;; Debugging and analysis.
  "gdb"
  "valgrind"
  "strace"

  ;; Version control and editing.
  "git"
  "vim"

  ;; Everyday command-line tools (also what scripts and CMake expect).
  "bash"
  "coreutils"
  "findutils"
  "grep"
  "sed"
  "gawk"
  "diffutils"
  "patch"
  "tar"
  "gzip"
  "xz"
  "which"
  "less"
  "file"

  ;; Network access: clone, fetch, talk to other machines.
  "openssh"
  "curl"
  "nss-certs"                           ;CA certificates for git/curl

  ;; Scripting used by build and test tooling.
  "python"))
