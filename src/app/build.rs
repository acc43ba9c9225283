//! The Guix image: `build`, and which image an instance boots.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{absolute_flag, Ctx};
use crate::cli::BuildArgs;
use crate::config::{Settings, Source, DEFAULT_IMAGE_SIZE};
use crate::guix::{self, BuildResult, Choice, InstanceImage};
use crate::instance::{read_json, write_json, Instance};

/// `build`: the image a plain `launch` of this instance would boot, built
/// or confirmed current. An existing instance's own choices (guix dir,
/// image size, key) count, so both resolve the same image.
pub fn build(ctx: &Ctx, a: BuildArgs) -> Result<BuildResult> {
    ctx.state.ensure()?;
    let saved: Option<Settings> = read_json(&ctx.instance().settings()).ok().flatten();
    let (saved_dir, saved_size) = match saved.as_ref().map(|s| &s.source) {
        Some(Source::Guix { guix_dir, image_size }) => (guix_dir.clone(), Some(image_size.clone())),
        _ => (None, None),
    };
    let key = match saved.and_then(|s| s.ssh_key) {
        Some(k) => k,
        None => crate::ssh::ensure_user_key(&ctx.state)?,
    };
    let req = guix::Request {
        guix_dir: guix::resolve_dir(absolute_flag(a.guix_dir)?.or(saved_dir).as_deref(), &ctx.state)?,
        image_size: a.image_size.or(saved_size).unwrap_or_else(|| DEFAULT_IMAGE_SIZE.into()),
        pubkey: crate::ssh::public_key_line(&key)?,
    };
    guix::ensure(&ctx.state, &req, ctx.quiet, &ctx.command("build"))
}

/// What to boot on a host without Guix: an image, a kernel, or (in a qbuf
/// checkout after tests/setup.sh) the busybox test guest.
fn without_guix(ctx: &Ctx) -> String {
    format!(
        "Without Guix, boot one of these:\n  an image you have:   {}\n  a kernel and initrd: {}\n  \
         the test guest (in a qbuf checkout, after tests/setup.sh):\n    {}",
        ctx.command("launch --image FILE"),
        ctx.command("launch --kernel FILE --initrd FILE --append \"console=ttyS0\""),
        ctx.command(
            "launch --kernel tests/guest/out/vmlinux --initrd tests/guest/out/initrd.img \
             --append \"console=ttyS0 quiet\" --memory 512M --ssh-port auto --no-share"
        )
    )
}

/// The Guix image an instance boots: its own while guix/ is unchanged, the
/// old one (said so) when it changed, a fresh build at first launch or with
/// `--recreate`.
pub fn instance_image(
    ctx: &Ctx,
    inst: &Instance,
    dir: Option<&Path>,
    image_size: &str,
    pubkey: &str,
    recreate: bool,
    notes: &mut Vec<String>,
) -> Result<PathBuf> {
    let req = guix::Request {
        guix_dir: guix::resolve_dir(dir, &ctx.state)?,
        image_size: image_size.to_string(),
        pubkey: pubkey.to_string(),
    };
    let key = req.key()?;
    let recorded: Option<InstanceImage> = read_json(&inst.guix_image())?;
    let rooted = match &recorded {
        Some(r) => guix::cached(&ctx.state, &r.key)?.is_some(),
        None => false,
    };
    match guix::choose(recorded.clone(), &key, recreate, rooted) {
        Choice::Current(r) => Ok(r.store_path),
        Choice::Outdated { keep } => {
            notes.push(format!(
                "{} (or the SSH key or image size) changed since this instance's image was built. It keeps booting its image, \
                 which stays protected from 'guix gc'. To move to the new image run '{}': \
                 that discards the guest's disk, so guest-local state is lost",
                req.guix_dir.display(),
                ctx.command("launch --recreate")
            ));
            Ok(keep.store_path)
        }
        Choice::Build => {
            let built = guix::ensure(&ctx.state, &req, ctx.quiet, &ctx.command("build")).map_err(|e| {
                match crate::host::find_in_path("guix") {
                    Some(_) => e,
                    None => anyhow::anyhow!("{e:#}\n{}", without_guix(ctx)),
                }
            })?;
            if let Some(old) = recorded.filter(|r| r.key != built.key) {
                guix::release_root(&ctx.state, inst);
                tracing::info!(old = %old.store_path.display(), "instance moved to a new image");
            }
            write_json(&inst.guix_image(), &InstanceImage { key: built.key, store_path: built.store_path.clone() })?;
            Ok(built.store_path)
        }
    }
}
