//! Making what authd writes survive a power cut, not only a process crash.
//!
//! A write is in the kernel's page cache until it is synced: a crashed process loses
//! nothing, a power cut loses it. `fsync`/`fdatasync` of a file makes its contents durable
//! (on a disk that honours cache flushes); a file created, renamed or removed is durable only
//! once the directory naming it is synced as well. The database does its own syncs
//! (`store::embedded`); these are for the other files and directories authd creates.

use std::fs::File;
use std::io;
use std::path::Path;

/// Syncs the directory `dir`, making the entries created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Syncs the directory that names `path` (after `path` was created or renamed).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Creates `dir` and any missing parents with `mode` (unix), then syncs the parent of each
/// directory it created, so that they survive a power cut. Succeeds if `dir` exists.
pub fn create_dir_all(dir: &Path, mode: u32) -> io::Result<()> {
    let created: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    builder.create(dir)?;
    for new in created.iter().rev() {
        sync_parent(new)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_missing_parents_and_accepts_an_existing_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        create_dir_all(&deep, 0o700).unwrap();
        assert!(deep.is_dir());
        create_dir_all(&deep, 0o700).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&deep).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        sync_parent(&deep.join("file")).unwrap();
        sync_dir(Path::new("")).unwrap();
    }
}
