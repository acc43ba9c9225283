//! What `build` reports.

use super::Render;
use crate::guix::BuildResult;

impl Render for BuildResult {
    fn human(&self) -> String {
        if self.cache_hit {
            format!("Image is up to date (guix/ unchanged; Guix not run): {}", self.store_path.display())
        } else {
            format!("Built {} in {:.0}s (GC root {})", self.store_path.display(), self.seconds, self.gc_root.display())
        }
    }
}
