//! What a hostile tar stream may make the host hold in memory. The tar
//! crate (0.4.46, `archive.rs`) reads a GNU long-name or long-link entry
//! (`L`, `K`) and a PAX header (`x`) whole into a `Vec`, whatever size the
//! header declares, and a GNU sparse file's map (`S` with extension
//! blocks) into a `Vec` for as long as the stream keeps sending map blocks:
//! a guest could declare gigabytes and make the tool run out of memory.
//! [`Framed`] sits in front of the archive, follows the stream's 512-byte
//! blocks exactly as the crate does (a PAX `size` included), and fails the
//! read when such metadata is larger than [`METADATA_LIMIT`]; every byte
//! passes through unchanged otherwise.

use std::io::{self, Read};

use tar::EntryType as T;

/// The most metadata one entry may carry: GNU tar writes a long name as
/// the name itself (Linux paths stop at 4 KiB), PAX headers as a few
/// `key=value` records.
pub const METADATA_LIMIT: u64 = 64 * 1024;

const BLOCK: usize = 512;

/// Where in the stream the next byte is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    /// A header block.
    Header,
    /// A GNU sparse file's extension block; the entry's data (`size`) follows the last.
    SparseMap { blocks: u64, size: u64 },
    /// `left` bytes of an entry's data and padding; the first `keep` are a PAX header's.
    Data { left: u64, keep: u64 },
    /// Past the end of the archive (or a header the crate refuses): the rest passes as it is.
    End,
}

/// A tar stream read through the 512-byte block structure, its metadata
/// entries bounded (see the module's comment).
pub struct Framed<R> {
    inner: R,
    at: At,
    /// A header or map block, read whole before it is judged; `block[served..filled]` is still to give out.
    block: [u8; BLOCK],
    served: usize,
    filled: usize,
    /// The PAX header being read, and the `size` the last one gave the next entry.
    pax: Vec<u8>,
    pax_size: Option<u64>,
}

impl<R: Read> Framed<R> {
    pub fn new(inner: R) -> Framed<R> {
        Framed { inner, at: At::Header, block: [0; BLOCK], served: 0, filled: 0, pax: vec![], pax_size: None }
    }

    /// Fills `block` from the stream; false at the stream's end (a short
    /// last block is given out as it is: the crate refuses it).
    fn fill(&mut self) -> io::Result<bool> {
        self.served = 0;
        self.filled = 0;
        while self.filled < BLOCK {
            match self.inner.read(&mut self.block[self.filled..]) {
                Ok(0) => break,
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.filled == BLOCK)
    }

    /// Judges the header block just read, as the crate's `next_entry_raw`
    /// and `next_entry` do: where its data ends, whether it is metadata
    /// the crate reads whole, and what a PAX header before it changed.
    fn header(&mut self) -> io::Result<At> {
        if self.block.iter().all(|b| *b == 0) {
            return Ok(At::End);
        }
        let mut h = tar::Header::new_old();
        h.as_mut_bytes().copy_from_slice(&self.block);
        let kind = h.entry_type();
        let Ok(declared) = h.entry_size() else { return Ok(At::End) };
        let extension = matches!(kind, T::GNULongName | T::GNULongLink | T::XHeader | T::XGlobalHeader);
        // The crate applies a PAX header's size to the next entry that is
        // not itself an extension, and forgets the PAX header once it hands
        // out an entry (anything but a long name, long link or PAX header
        // with a ustar or GNU magic).
        let size = if extension { declared } else { self.pax_size.unwrap_or(declared) };
        let held = (h.as_gnu().is_some() || h.as_ustar().is_some())
            && matches!(kind, T::GNULongName | T::GNULongLink | T::XHeader);
        if !held {
            self.pax_size = None;
        }
        if extension && size > METADATA_LIMIT {
            return Err(refused(size, describe(kind)));
        }
        let sparse_map = kind == T::GNUSparse && h.as_gnu().is_some_and(|g| g.is_extended());
        Ok(match size.checked_next_multiple_of(BLOCK as u64) {
            None => At::End,
            Some(_) if sparse_map => At::SparseMap { blocks: 0, size },
            Some(left) => data(left, if held && kind == T::XHeader { size } else { 0 }),
        })
    }

    /// Judges the extension block of a sparse map just read.
    fn map_block(&mut self, blocks: u64, size: u64) -> io::Result<At> {
        let blocks = blocks + 1;
        if blocks * BLOCK as u64 > METADATA_LIMIT {
            return Err(refused(blocks * BLOCK as u64, "sparse-file map"));
        }
        // `isextended` of `GnuExtSparseHeader`: 21 entries of 24 bytes come first.
        Ok(match (self.block[504] == 1, size.checked_next_multiple_of(BLOCK as u64)) {
            (true, _) => At::SparseMap { blocks, size },
            (false, Some(left)) => data(left, 0),
            (false, None) => At::End,
        })
    }

    /// Passes up to `left` bytes of data through, keeping a PAX header's.
    fn data(&mut self, buf: &mut [u8], left: u64, keep: u64) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Ok(0);
        }
        let kept = n.min(usize::try_from(keep).unwrap_or(usize::MAX));
        self.pax.extend_from_slice(&buf[..kept]);
        let (left, keep) = (left - n as u64, keep - kept as u64);
        if kept > 0 && keep == 0 {
            self.pax_size = pax_size(&std::mem::take(&mut self.pax));
        }
        self.at = if left == 0 { At::Header } else { At::Data { left, keep } };
        Ok(n)
    }
}

impl<R: Read> Read for Framed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.served < self.filled {
            let n = buf.len().min(self.filled - self.served);
            buf[..n].copy_from_slice(&self.block[self.served..self.served + n]);
            self.served += n;
            return Ok(n);
        }
        match self.at {
            At::End => self.inner.read(buf),
            At::Data { left, keep } => self.data(buf, left, keep),
            At::Header | At::SparseMap { .. } => {
                let whole = self.fill()?;
                self.at = match (whole, self.at) {
                    (false, _) => At::End,
                    (true, At::SparseMap { blocks, size }) => self.map_block(blocks, size)?,
                    (true, _) => self.header()?,
                };
                if self.filled == 0 {
                    return Ok(0);
                }
                self.read(buf)
            }
        }
    }
}

/// An entry's data, or the next header when it has none.
fn data(left: u64, keep: u64) -> At {
    if left == 0 {
        At::Header
    } else {
        At::Data { left, keep }
    }
}

/// The `size` record of a PAX header, read as the crate's
/// `pax_extensions_value` reads it (any flaw: none).
fn pax_size(pax: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(pax) {
        let ext = ext.ok()?;
        if ext.key() == Ok("size") {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

fn describe(kind: T) -> &'static str {
    match kind {
        T::GNULongName => "file-name header",
        T::GNULongLink => "link-name header",
        T::XHeader => "PAX header",
        _ => "PAX global header",
    }
}

fn refused(size: u64, what: &str) -> io::Error {
    let size = match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s.div_ceil(1024)),
    };
    io::Error::other(format!(
        "the guest's tar stream has a {size} {what}; refusing (at most {} KiB is read)",
        METADATA_LIMIT / 1024
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block of `kind` that declares `size` bytes of data.
    fn header(kind: T, path: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_path(path).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    /// Reads everything through [`Framed`]: the error, and how much of the
    /// stream was taken from the guest.
    fn through(stream: impl Read) -> (io::Result<Vec<u8>>, u64) {
        let mut taken = stream.take(u64::MAX);
        let mut out = vec![];
        let r = Framed::new(&mut taken).read_to_end(&mut out).map(|_| out);
        (r, u64::MAX - taken.limit())
    }

    #[test]
    fn a_huge_name_or_pax_header_is_refused_before_its_data_is_read() {
        for (kind, what) in
            [(T::GNULongName, "file-name header"), (T::GNULongLink, "link-name header"), (T::XHeader, "PAX header")]
        {
            // 300 MiB the guest would send, never read into memory.
            let data = io::repeat(b'a').take(300 << 20);
            let stream = io::Cursor::new(header(kind, "././@LongLink", 300 << 20)).chain(data);
            let (r, taken) = through(stream);
            let e = r.unwrap_err().to_string();
            assert!(e.contains(&format!("has a 300 MiB {what}; refusing")), "{e}");
            assert!(taken <= BLOCK as u64, "{taken} bytes read");
        }
        // Through the archive, as `unpack` reads it.
        let root = tempfile::tempdir().unwrap();
        let data = io::repeat(b'a').take(300 << 20);
        let stream = io::Cursor::new(header(T::GNULongName, "././@LongLink", 300 << 20)).chain(data);
        let e = format!("{:#}", super::super::unpack(stream, root.path(), "out").unwrap_err());
        assert!(e.contains("300 MiB file-name header; refusing"), "{e}");
    }

    #[test]
    fn an_endless_sparse_map_is_refused() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::GNUSparse);
        h.set_path("out/sparse").unwrap();
        h.set_size(0);
        h.as_gnu_mut().unwrap().set_is_extended(true);
        h.set_cksum();
        let mut map = tar::GnuExtSparseHeader::new();
        map.set_is_extended(true);
        let maps = RepeatBlock(map.as_bytes().to_vec(), 0).take(64 << 20);
        let (r, taken) = through(io::Cursor::new(h.as_bytes().to_vec()).chain(maps));
        assert!(r.unwrap_err().to_string().contains("sparse-file map; refusing"));
        assert!(taken <= METADATA_LIMIT + 2 * BLOCK as u64, "{taken} bytes read");
    }

    /// One block, sent again and again.
    struct RepeatBlock(Vec<u8>, usize);

    impl Read for RepeatBlock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len() - self.1);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 = (self.1 + n) % self.0.len();
            Ok(n)
        }
    }

    /// A PAX header gives the next entry's size; the header after that
    /// entry's data is still judged (a reader that took the ustar size, 0,
    /// would take the zero data for the archive's end and pass all the rest).
    #[test]
    fn a_pax_size_moves_the_next_header_as_the_crate_does() {
        let mut s = header(T::XHeader, "pax", 13);
        s.extend(b"13 size=1024\n");
        s.resize(s.len() + BLOCK - 13, 0);
        let mut file = tar::Header::new_ustar();
        file.set_path("out/f").unwrap();
        file.set_size(0);
        file.set_cksum();
        s.extend(file.as_bytes());
        s.extend([0; 1024]);
        s.extend(header(T::GNULongName, "././@LongLink", 1 << 20));
        let (r, taken) = through(io::Cursor::new(s).chain(io::repeat(b'a').take(1 << 20)));
        assert!(r.unwrap_err().to_string().contains("1 MiB file-name header"));
        assert!(taken <= 4 * BLOCK as u64 + 1024, "{taken}");
    }

    #[test]
    fn a_stream_within_the_limits_passes_unchanged() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("comment", "x".repeat(3000).as_bytes())]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(4);
        let long = format!("out/{}long", "sub/".repeat(40));
        b.append_data(&mut h, &long, &b"long"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "out/link", format!("/{}", "x".repeat(200))).unwrap();
        let stream = b.into_inner().unwrap();
        let (r, taken) = through(&stream[..]);
        assert_eq!((r.unwrap(), taken), (stream.clone(), stream.len() as u64));
        let root = tempfile::tempdir().unwrap();
        let u = super::super::unpack(&stream[..], root.path(), "out").unwrap();
        assert_eq!(std::fs::read_to_string(root.path().join(&long)).unwrap(), "long");
        assert_eq!(u.skipped[0].target.as_deref().map(str::len), Some(201), "{u:?}");
    }
}
