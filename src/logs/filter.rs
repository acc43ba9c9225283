//! The filter of the guest's terminal controls: what the guest wrote
//! (its console, its ssh's stderr, its commands' messages) on its way to
//! the user's terminal.

/// Removes the terminal control sequences a guest prints on its console
/// (cursor moves, colours, `ESC[6n` which would make the user's terminal
/// type an answer, OSC titles) and other control characters, keeping text,
/// newlines and tabs. C1 controls go too, in their UTF-8 form (`C2 9B`) and
/// as raw bytes (`9B` is CSI to a terminal that reads 8-bit controls): a
/// byte 0x80–0x9f passes only inside a UTF-8 character. A carriage return
/// passes only before a newline; a bare one (which would let later text
/// overwrite a line already shown) becomes a newline. Fed in chunks: a
/// sequence split between two chunks is still recognised.
#[derive(Debug, Default)]
pub struct TerminalFilter {
    state: Filter,
    /// The UTF-8 character begun: passed on only once it is whole.
    char: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Filter {
    #[default]
    Text,
    Esc,
    /// `ESC [` … a final byte in `@`..`~`.
    Csi,
    /// OSC, DCS and the like: up to BEL or `ESC \`.
    Str,
    StrEsc,
    /// 0xC2: maybe the UTF-8 form of a C1 control.
    C2,
    /// Inside a UTF-8 character: this many continuation bytes to come.
    Utf8(u8),
    /// After one or more `\r`: kept before a newline, else a newline.
    Cr,
}

impl TerminalFilter {
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.state = match (self.state, b) {
                (Filter::C2, 0x80..=0x9f) => c1(b),
                (Filter::C2, 0xa0..=0xbf) => {
                    out.extend_from_slice(&[0xc2, b]);
                    Filter::Text
                }
                (Filter::C2, _) => {
                    out.push(0xc2);
                    self.text(b, out)
                }
                (Filter::Utf8(n), 0x80..=0xbf) => {
                    self.char.push(b);
                    if n > 1 {
                        Filter::Utf8(n - 1)
                    } else if std::str::from_utf8(&self.char).is_ok() {
                        out.append(&mut self.char);
                        Filter::Text
                    } else {
                        // Shaped like a character but not one (`E0 9B 80`,
                        // a surrogate): a reader sees its bytes alone, so
                        // its C1 bytes go as in a cut-short one.
                        out.extend(self.char.drain(..).filter(|c| !(0x80..=0x9f).contains(c)));
                        Filter::Text
                    }
                }
                // A character cut short (not UTF-8: passed on for the
                // reader's replacement character, but never its C1 bytes);
                // `b` starts something else.
                (Filter::Utf8(_), _) => {
                    out.extend(self.char.drain(..).filter(|c| !(0x80..=0x9f).contains(c)));
                    self.text(b, out)
                }
                (Filter::Cr, b'\r') => Filter::Cr,
                (Filter::Cr, b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    Filter::Text
                }
                (Filter::Cr, _) => {
                    out.push(b'\n');
                    self.text(b, out)
                }
                (Filter::Text, _) => self.text(b, out),
                (Filter::Esc, b'[') => Filter::Csi,
                (Filter::Esc, b']' | b'P' | b'X' | b'^' | b'_') => Filter::Str,
                (Filter::Esc, 0x20..=0x2f) => Filter::Esc,
                (Filter::Esc | Filter::Csi, b'\n') => {
                    out.push(b);
                    Filter::Text
                }
                (Filter::Esc, _) => Filter::Text,
                (Filter::Csi, 0x40..=0x7e) => Filter::Text,
                (Filter::Csi, _) => Filter::Csi,
                (Filter::Str | Filter::StrEsc, 0x07) => Filter::Text,
                (Filter::Str | Filter::StrEsc, 0x1b) => Filter::StrEsc,
                (Filter::StrEsc, b'\\') => Filter::Text,
                (Filter::Str | Filter::StrEsc, _) => Filter::Str,
            };
        }
    }

    fn text(&mut self, b: u8, out: &mut Vec<u8>) -> Filter {
        match b {
            0x1b => Filter::Esc,
            b'\r' => Filter::Cr,
            b'\n' | b'\t' => {
                out.push(b);
                Filter::Text
            }
            0x00..=0x1f | 0x7f => Filter::Text,
            // A raw C1 control outside a UTF-8 character.
            0x80..=0x9f => c1(b),
            0xc2 => Filter::C2,
            // Lead bytes of 2, 3 and 4-byte characters (0xc0, 0xc1 and
            // 0xf5.. lead nothing valid, and pass as bytes on their own).
            0xc3..=0xf4 => {
                self.char.clear();
                self.char.push(b);
                Filter::Utf8(match b {
                    0xc3..=0xdf => 1,
                    0xe0..=0xef => 2,
                    _ => 3,
                })
            }
            _ => {
                out.push(b);
                Filter::Text
            }
        }
    }

    /// `input` filtered in one go.
    pub fn clean(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        TerminalFilter::default().push(input, &mut out);
        out
    }
}

/// What a C1 control (`b` in 0x80–0x9f, raw or after 0xC2) starts: CSI
/// its parameters, DCS, SOS, OSC, PM and APC a string; the rest stand alone.
fn c1(b: u8) -> Filter {
    match b {
        0x9b => Filter::Csi,
        0x90 | 0x98 | 0x9d..=0x9f => Filter::Str,
        _ => Filter::Text,
    }
}

/// What the guest wrote, as text fit for the user's terminal: its control
/// sequences removed (the guest is untrusted), trimmed, at most `max`
/// characters.
pub fn guest_text(bytes: &[u8], max: usize) -> String {
    let clean = TerminalFilter::clean(bytes);
    String::from_utf8_lossy(&clean).trim().chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `raw` fed in two chunks, cut anywhere, is filtered as in one go.
    fn same_split_anywhere(raw: &[u8]) {
        for cut in 0..raw.len() {
            let mut f = TerminalFilter::default();
            let mut out = Vec::new();
            f.push(&raw[..cut], &mut out);
            f.push(&raw[cut..], &mut out);
            assert_eq!(out, TerminalFilter::clean(raw), "cut at {cut}");
        }
    }

    #[test]
    fn terminal_escapes_from_the_guest_are_not_passed_on() {
        let raw = b"a\x1b[6nb\x1b[1;31mred\x1b[0m\x1b]0;title\x07c\x1b(Bd\x07\x08e\r\n\tf\xc2\x9b2Jg \xc3\xa9\xc2\xa0";
        assert_eq!(TerminalFilter::clean(raw), "ab\u{72}edcde\r\n\tfg \u{e9}\u{a0}".as_bytes());
        same_split_anywhere(raw);
    }

    #[test]
    fn raw_c1_controls_and_bare_carriage_returns_are_not_passed_on() {
        // 0x9b is CSI to a terminal that reads 8-bit controls; 0x9d OSC.
        let raw = b"a\x9b2Jb\x9d0;title\x07c\x85d";
        assert_eq!(TerminalFilter::clean(raw), b"abcd");
        // Inside a UTF-8 character the same bytes are text: U+00DB, U+061B.
        let utf8 = "\u{db}\u{61b}\u{1f600}".as_bytes();
        assert_eq!(TerminalFilter::clean(utf8), utf8);
        // A character cut short does not smuggle a C1 byte through.
        assert_eq!(TerminalFilter::clean(b"\xe2\x9b2Jx"), b"\xe22Jx");
        // Nor does one shaped right but not UTF-8 (overlong, surrogate,
        // past U+10FFFF): a reader sees its bytes alone.
        for bad in [&b"\xe0\x9b\x80"[..], b"\xed\xa0\x9b", b"\xf4\x90\x9b\x80"] {
            let out = TerminalFilter::clean(bad);
            assert!(!out.iter().any(|c| (0x80..=0x9f).contains(c)), "{bad:x?} gave {out:x?}");
        }
        // A bare CR would let "all good" hide what came before it.
        assert_eq!(TerminalFilter::clean(b"error\rall good\r\r\nend\r"), b"error\nall good\r\nend");
        let raw: &[u8] = b"\xc3\x9bx\x9b31my\r\r\nz\rw";
        same_split_anywhere(raw);
        assert_eq!(TerminalFilter::clean(raw), b"\xc3\x9bxy\r\nz\nw");
        assert_eq!(guest_text(b"  \x1b]0;x\x07Permission denied\x9b2J \n", 100), "Permission denied");
    }
}
