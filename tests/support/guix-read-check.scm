;; tests/support/guix-read-check.scm -- check that Guix configuration files
;; are well-formed S-expressions, without needing Guix.
;;
;; Usage:
;;   guile --no-auto-compile -s tests/support/guix-read-check.scm FILE.scm...
;;   guile --no-auto-compile -s tests/support/guix-read-check.scm \
;;     --forms FILE.scm HEAD...
;;
;; Every top-level form of every FILE is read with Guile's reader, extended
;; the way Guix extends it, and nothing is evaluated.  Exit status 0 when all
;; files read cleanly; otherwise 1, with one "FILE:LINE:COLUMN: ..." line per
;; bad file on stderr (Guile's own message, plus where the form that could
;; not be read starts).
;;
;; With --forms, FILE is read the same way and every form in it, at any
;; depth, whose first element is one of the HEAD symbols is written on
;; stdout, one per line, in the order met (outer forms before the forms
;; inside them).  Comments are gone by then, so tests can check what the
;; code says rather than what its comments say.
;;
;; Guix's reader extensions are registered as stand-ins, mirroring the
;; "Syntactic sugar" section at the end of guix/gexp.scm:
;;   #~EXP   => (gexp EXP)
;;   #$EXP   => (ungexp EXP)            #$@EXP => (ungexp-splicing EXP)
;;   #+EXP   => (ungexp-native EXP)     #+@EXP => (ungexp-native-splicing EXP)
;; and, as in Guix, #$name:output => (ungexp name "output").

(use-modules (ice-9 match)
             (ice-9 format))

(define (read-ungexp chr port native?)
  (define unquote-symbol
    (if (eqv? (peek-char port) #\@)
        (begin
          (read-char port)
          (if native? 'ungexp-native-splicing 'ungexp-splicing))
        (if native? 'ungexp-native 'ungexp)))
  (match (read port)
    ((? symbol? symbol)
     (let* ((str   (symbol->string symbol))
            (colon (string-index-right str #\:)))
       (if colon
           (list unquote-symbol
                 (string->symbol (substring str 0 colon))
                 (substring str (+ colon 1)))
           (list unquote-symbol symbol))))
    (x (list unquote-symbol x))))

(read-hash-extend #\~ (lambda (chr port) (list 'gexp (read port))))
(read-hash-extend #\$ (lambda (chr port) (read-ungexp chr port #f)))
(read-hash-extend #\+ (lambda (chr port) (read-ungexp chr port #t)))

(define (skip-blanks-and-comments port)
  ;; Move PORT past whitespace and ';' comments so that the position we
  ;; report is where the next datum (or block comment) starts.
  (let loop ()
    (let ((c (peek-char port)))
      (cond ((eof-object? c) #t)
            ((char-whitespace? c) (read-char port) (loop))
            ((char=? c #\;)
             (let skip ()
               (let ((c (read-char port)))
                 (unless (or (eof-object? c) (char=? c #\newline))
                   (skip))))
             (loop))
            (else #t)))))

(define (describe-error key args)
  ;; Turn a Guile error into one line of text.
  (match args
    ((subr (? string? message) (? list? fmt-args) . _)
     (string-append
      (if subr (format #f "~a: " subr) "")
      (catch #t
        (lambda () (apply format #f message fmt-args))
        (lambda _ message))))
    (_ (format #f "~s ~s" key args))))

(define %read-failed
  ;; Unique marker returned when 'read' fails (a file may well contain #f).
  (list 'read-failed))

(define (check-file file)
  "Read every top-level form of FILE.  Return #t on success; otherwise print
the problem on the error port and return #f."
  (catch #t
    (lambda ()
      (call-with-input-file file
        (lambda (port)
          (let loop ((count 0))
            (skip-blanks-and-comments port)
            (let* ((line   (+ 1 (port-line port)))
                   (column (+ 1 (port-column port)))
                   (datum  (catch #t
                             (lambda () (read port))
                             (lambda (key . args)
                               (format (current-error-port)
                                       "~a:~a:~a: cannot read the form \
starting here: ~a~%"
                                       file line column
                                       (describe-error key args))
                               %read-failed))))
              (cond ((eq? datum %read-failed) #f)
                    ((eof-object? datum)
                     (if (zero? count)
                         (begin
                           (format (current-error-port)
                                   "~a:1:1: no Scheme form in file~%" file)
                           #f)
                         #t))
                    (else (loop (+ count 1)))))))))
    (lambda (key . args)
      (format (current-error-port) "~a: ~a~%" file (describe-error key args))
      #f)))

(define (read-all file)
  "Return the list of top-level forms of FILE."
  (call-with-input-file file
    (lambda (port)
      (let loop ((forms '()))
        (let ((datum (read port)))
          (if (eof-object? datum)
              (reverse forms)
              (loop (cons datum forms))))))))

(define (write-forms file heads)
  "Write every form of FILE, at any depth, whose car is in HEADS."
  (let walk ((x (read-all file)))
    (when (pair? x)
      (when (memq (car x) heads)
        (write x)
        (newline))
      ;; Walk the elements, including the tail of an improper list.
      (let loop ((rest x))
        (cond ((pair? rest) (walk (car rest)) (loop (cdr rest)))
              ((null? rest) #t)
              (else (walk rest)))))))

(define (main args)
  (match args
    (()
     (format (current-error-port)
             "usage: guile --no-auto-compile -s guix-read-check.scm FILE...~%")
     (exit 2))
    (("--forms" file heads ..1)
     (if (check-file file)
         (begin
           (write-forms file (map string->symbol heads))
           (exit 0))
         (exit 1)))
    (files
     ;; Check every file, even after a failure, so all problems are shown.
     (let ((results (map check-file files)))
       (if (and-map identity results)
           (begin
             (format #t "read OK: ~a file(s)~%" (length files))
             (exit 0))
           (exit 1))))))

(main (cdr (command-line)))
