//! QEMU as data and as a program: its command line built with no I/O
//! ([`args`], its option values escaped by [`value`]; a port forward's rule in [`forward`]), disk images ([`image`]), readers of its output ([`parse`]),
//! the binaries and KVM on this host ([`binaries`]), and virtio-fs shares'
//! `virtiofsd` ([`virtiofs`]).

pub mod args;
pub mod binaries;
pub mod forward;
pub mod image;
pub mod parse;
pub mod value;
pub mod virtiofs;
