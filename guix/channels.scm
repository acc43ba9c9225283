;; guix/channels.scm -- the Guix revision the qbuf dev VM is built from.
;;
;; qbuf-qemu never uses the host's own Guix revision: it always runs
;;
;;   guix time-machine -C guix/channels.scm -- system image ... guix/dev-vm.scm
;;
;; so every contributor gets the same compilers, libraries and services.
;;
;; Pinned revision: the GNU Guix 1.5.0 release commit.  Evidence: Guix's own
;; `guix' package definition (gnu/packages/package-management.scm) at the
;; 1.5.0 release reads (version "1.5.0") (revision 0)
;; (commit "230aa373f315f247852ee07dff34146e9b480aec"), i.e. the package
;; points exactly at the release commit, and substitutes (pre-built binaries)
;; exist for a release, so the first build downloads rather than compiles.
;;
;; URL: Guix moved its repository in 2025; the canonical URL is now
;; git.guix.gnu.org -- the one the 1.5.0 `guix' package itself fetches from,
;; and the one recent `guix describe -f channels' output shows.  The old
;; Savannah URL (https://git.savannah.gnu.org/git/guix.git) is not
;; guaranteed to have commits made after the move, so it is not used here.
;;
;; Channel introduction: commit 9edb3f66fd807b096b48283debdcddccfea34bad
;; signed by OpenPGP key BBB0 2DDF 2CEA F6A8 0D1D  E643 A2A0 6DF2 A33A 54FA;
;; copied from %guix-channel-introduction in Guix's guix/channels.scm.  It is
;; what lets `guix time-machine' authenticate every commit it fetches.
;;
;; To move to a newer Guix:
;;
;;   guix pull                      # or: guix pull --commit=<hash>
;;   guix describe -f channels > guix/channels.scm
;;
;; (the second command overwrites this file: put this comment block back,
;; with the "Pinned revision" paragraph updated), then run `qbuf-qemu build'
;; to get an image built from the new revision.
(list (channel
        (name 'guix)
        (url "https://git.guix.gnu.org/guix.git")
        (branch "master")
        (commit
          "230aa373f315f247852ee07dff34146e9b480aec")
        (introduction
          (make-channel-introduction
            "9edb3f66fd807b096b48283debdcddccfea34bad"
            (openpgp-fingerprint
              "BBB0 2DDF 2CEA F6A8 0D1D  E643 A2A0 6DF2 A33A 54FA")))))
