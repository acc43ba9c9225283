//! QEMU as data and as a program: its command line built with no I/O
//! ([`args`]), disk images ([`image`]), readers of its output ([`parse`]),
//! and the binaries and KVM on this host ([`host`]).

pub mod args;
pub mod host;
pub mod image;
pub mod parse;
