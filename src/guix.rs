//! Building the Guix System image (placeholder until the Guix step lands).
use crate::instance::{Instance, StateDir};

/// Drops the instance's GC root on its Guix image, if it has one.
pub fn release_root(_state: &StateDir, inst: &Instance) {
    let _ = std::fs::remove_file(inst.gc_root());
}
