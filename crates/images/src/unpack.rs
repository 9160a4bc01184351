//! One layer's tar stream into a directory, with OCI whiteouts turned into
//! overlayfs's: `.wh.NAME` → a character device 0/0 named NAME (hides NAME
//! of the layers below), `.wh..wh..opq` → `trusted.overlay.opaque=y` on its
//! directory (hides everything below it). Paths that would leave the
//! directory are refused, as `tar`'s `unpack_in` refuses them, also when
//! they would leave it through a symbolic link the layer made. Device nodes
//! in a layer are not made.

use std::ffi::CString;
use std::io::Read;
use std::path::{Component, Path};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

fn inside(path: &Path) -> std::io::Result<()> {
    if path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} leaves the layer", path.display()),
        ))
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)
}

/// Unpacks the tar stream `reader` into `dest` (an empty directory).
pub fn unpack_layer(reader: impl Read, dest: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    // As root, files keep the owners the image gave them.
    // SAFETY: geteuid has no preconditions.
    archive.set_preserve_ownerships(unsafe { libc::geteuid() } == 0);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // No device nodes from an image: a container's /dev is its
        // runtime's, and a node in a layer would be a way to the host's
        // devices for whoever reached it.
        if matches!(
            entry.header().entry_type(),
            tar::EntryType::Block | tar::EntryType::Char
        ) {
            continue;
        }
        if !name.starts_with(WHITEOUT) {
            entry.unpack_in(dest)?;
            continue;
        }
        inside(&path)?;
        let dir = dest.join(path.parent().unwrap_or(Path::new("")));
        std::fs::create_dir_all(&dir)?;
        // A directory of the layer may be a symbolic link out of it (made
        // by an earlier entry): a whiteout is never written through one.
        if !std::fs::canonicalize(&dir)?.starts_with(std::fs::canonicalize(dest)?) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} leaves the layer through a link", path.display()),
            ));
        }
        if name == OPAQUE {
            let at = c_path(&dir)?;
            let key = CString::new("trusted.overlay.opaque").expect("static");
            // SAFETY: NUL-terminated path and name, and a one-byte value,
            // all alive for the call.
            if unsafe { libc::lsetxattr(at.as_ptr(), key.as_ptr(), b"y".as_ptr().cast(), 1, 0) }
                != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        } else {
            let hidden = dir.join(&name[WHITEOUT.len()..]);
            let _ = std::fs::remove_file(&hidden);
            let at = c_path(&hidden)?;
            // SAFETY: a NUL-terminated path alive for the call.
            if unsafe { libc::mknod(at.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(0);
            if kind.is_symlink() {
                b.append_link(&mut h, path, link).unwrap();
            } else {
                // Written raw: the builder itself refuses `..`, an attacker's would not.
                h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_whiteout_never_reaches_through_a_link_out_of_the_layer() {
        let base = std::env::temp_dir().join(format!("commons-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "keep me").unwrap();
        let dest = base.join("layer");
        std::fs::create_dir_all(&dest).unwrap();
        let evil = tar_of(&[
            ("escape", tar::EntryType::Symlink, outside.to_str().unwrap()),
            ("escape/.wh.precious", tar::EntryType::Regular, ""),
        ]);
        let e = unpack_layer(&evil[..], &dest).unwrap_err();
        assert!(e.to_string().contains("through a link"), "{e}");
        assert_eq!(
            std::fs::read_to_string(outside.join("precious")).unwrap(),
            "keep me"
        );
        let planted = tar_of(&[
            ("escape", tar::EntryType::Symlink, outside.to_str().unwrap()),
            ("escape/planted", tar::EntryType::Regular, ""),
        ]);
        assert!(unpack_layer(&planted[..], &base.join("layer3")).is_err());
        assert!(
            !outside.join("planted").exists(),
            "nothing written through the link"
        );
        let device = tar_of(&[("disk", tar::EntryType::Block, "")]);
        unpack_layer(&device[..], &base.join("layer4")).unwrap();
        assert!(
            !base.join("layer4/disk").exists(),
            "no device node from an image"
        );
        let dots = tar_of(&[("../.wh.precious", tar::EntryType::Regular, "")]);
        assert!(unpack_layer(&dots[..], &base.join("layer2")).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
