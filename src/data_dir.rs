//! The data directory (`db/`, `server.key`, `admin.key`) and who may read it.
//!
//! - The directory is created with mode 0700. An existing one that group or others may
//!   enter is made 0700 if it is empty and ours (made for authd: `mkdir`, a fresh volume or
//!   temporary directory) and refused otherwise, with the `chmod 700` that fixes it: authd
//!   does not change the mode of a directory that already holds something (`--data` pointed
//!   at a home or a shared directory must not get it locked).
//! - A process that opens a data directory sets its umask to 077 for the rest of its life,
//!   so every file sled creates, at open and later (snapshots, blobs), is 0600 and every
//!   directory 0700.
//! - Once the database is open, whatever in `db/` group or others may still read (files made
//!   by an authd before this rule) is made owner-only ([`tighten`]).
//! - Key files are read only when group and others have no access to them, as ssh does
//!   with private keys ([`read_private`]); otherwise the start is refused with the
//!   `chmod 600` that fixes it.

use std::io;
use std::path::Path;

use zeroize::Zeroizing;

/// Sets the process umask to 077: files created from now on are owner-only.
pub fn restrict_umask() {
    #[cfg(unix)]
    // SAFETY: umask(2) cannot fail and touches no memory; it only sets the process's mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Makes `dir` ready to hold secrets: restricts the umask ([`restrict_umask`]), creates the
/// directory (mode 0700, parents too) if it is missing, makes an empty one of ours 0700, and
/// refuses one with something in it that group or others may read, write or enter.
pub fn prepare(dir: &Path) -> io::Result<()> {
    restrict_umask();
    // Synced into its parent: the keys and database in it must survive a power cut.
    crate::durable::create_dir_all(dir, 0o700)
        .map_err(|e| io::Error::new(e.kind(), format!("data directory {}: {e}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(dir)?;
        let mode = meta.permissions().mode() & 0o777;
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let ours = meta.uid() == unsafe { libc::geteuid() };
        if mode & 0o077 != 0 && ours && std::fs::read_dir(dir)?.next().is_none() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        } else if mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "data directory {dir} has mode {mode:04o}: group or others may read it, and it holds the database and the server key; make it owner-only: chmod 700 {dir}",
                    dir = dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Reads a key file that must be private: refused (`PermissionDenied`, the message says
/// the mode and the `chmod 600` that fixes it) if group or others have any access to it. The
/// text is wiped when dropped.
pub fn read_private(path: &Path) -> io::Result<Zeroizing<String>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The mode of the file opened, not of whatever is at the path by now.
        let mode = file.metadata()?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "mode {mode:04o} lets group or others read it; it must be readable by its owner only: chmod 600 {}",
                    path.display()
                ),
            ));
        }
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// Makes everything under `dir` that group or others may access owner-only (keeping the
/// owner's bits). Symbolic links are left alone, not followed. Returns how many entries it
/// changed.
pub fn tighten(dir: &Path) -> io::Result<usize> {
    let mut changed = 0;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))?;
                changed += 1;
            }
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    pending.push(entry?.path());
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(changed)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn prepare_creates_0700_and_refuses_an_open_directory_with_something_in_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // Empty and ours: made for authd, so made private.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::write(dir.join("something"), "x").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = prepare(&dir).unwrap_err().to_string();
        assert!(
            e.contains("0750") && e.contains(&format!("chmod 700 {}", dir.display())),
            "{e}"
        );
        assert_eq!(mode(&dir), 0o750, "the mode is the operator's to change");
    }

    /// sled makes files at open and later (snapshots, blobs): the umask, not [`tighten`],
    /// is what keeps those owner-only.
    #[test]
    fn after_prepare_sled_and_everything_else_create_owner_only_files() {
        // SAFETY: as in `restrict_umask`.
        unsafe {
            libc::umask(0o022);
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        prepare(&root).unwrap();
        let db = root.join("db");
        let store = sled::open(&db).unwrap();
        store.insert(b"k", vec![1u8; 100_000]).unwrap();
        store.flush().unwrap();
        std::fs::write(root.join("later"), "x").unwrap();
        std::fs::create_dir(root.join("later-dir")).unwrap();
        let mut pending = vec![root.clone()];
        let mut seen = 0;
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                assert_eq!(
                    mode(&path) & 0o077,
                    0,
                    "{} is {:o}",
                    path.display(),
                    mode(&path)
                );
                seen += 1;
                if path.is_dir() {
                    pending.push(path);
                }
            }
        }
        assert!(seen > 4, "sled made its files");
    }

    #[test]
    fn read_private_refuses_a_file_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "secret-text").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_private(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let e = e.to_string();
        assert!(e.contains("0640") && e.contains("chmod 600"), "{e}");
        assert!(!e.contains("secret-text"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_private(&path).unwrap().as_str(), "secret-text");
    }

    #[test]
    fn tighten_makes_everything_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = sub.join("f");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(tighten(dir.path()).unwrap(), 2);
        assert_eq!((mode(&sub), mode(&file)), (0o700, 0o600));
        assert_eq!(tighten(dir.path()).unwrap(), 0);
    }
}
