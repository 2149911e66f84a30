//! Putting sled's writes on stable storage.
//!
//! sled 0.34's `Db::flush` writes its log buffers with `pwrite` and ends with
//! `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`: that waits for the kernel to hand the
//! pages to the disk, but flushes neither the disk's volatile write cache nor the file's
//! metadata (its size, as the log grows), so after a power cut the change may be gone. sled
//! calls a real `fsync` only from its background flusher, every 500 ms (sled issue #1452).
//! [`Disk::sync`] therefore follows sled's flush with syncs of its own, through handles kept
//! open: one per group-commit batch, shared by every change in it.
//!
//! What sled 0.34.7 writes in its directory, and when (read from its source):
//!
//! | file | written | synced by sled | synced here |
//! |---|---|---|---|
//! | `db`: the log; its segments are offsets in this one file | every flush | by the flusher (500 ms), at truncation | `fdatasync` at every [`Disk::sync`] |
//! | `blobs/<lsn>`: a log message too big for a segment (> 128 KiB: authd's records are far smaller, but a tree node of many long keys could reach it) | created new, when the message is written | never | every [`Disk::sync`] fsyncs the blob files it has not seen before, then `blobs/` |
//! | `conf`: the storage parameters | created at the first open | never | at [`Disk::open`] |
//! | `snap.<lsn>`: the page table at recovery | at open only: written as `.generating`, fsynced, renamed | the file, not the rename | at [`Disk::open`] (the directory) |
//! | the directory itself and `blobs/` | created at the first open | never | at [`Disk::open`] (and their parents) |
//!
//! Files are created or renamed in the database directory only while sled opens, so after
//! [`Disk::open`] only `blobs/` can gain entries.
//!
//! A failed sync leaves the state on disk unknown; the caller must not answer from memory.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::store::records::StoreError;

/// The database and what makes its writes durable.
pub struct Disk {
    db: sled::Db,
    /// `None` for a temporary database (nothing to keep).
    files: Option<Mutex<Files>>,
}

/// Handles kept open from one sync to the next.
struct Files {
    /// `<dir>/db`, sled's log.
    log: File,
    /// `<dir>/blobs`.
    blob_dir_path: PathBuf,
    blob_dir: File,
    /// The blob files already synced.
    blobs: HashSet<OsString>,
}

impl Disk {
    /// After `sled::open` of `dir`: syncs everything sled created or renamed while opening
    /// (`conf`, the log, blob files, a new snapshot's name, the directories and the entry of
    /// `dir` in its parent), and keeps the handles [`Disk::sync`] uses.
    pub fn open(db: sled::Db, dir: &Path) -> Result<Disk, StoreError> {
        let io = |what: &str, path: &Path, e| failed(format!("{what} {}", path.display()), e);
        let sync_file = |path: &Path| {
            File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("fsync", path, e))
        };
        let log_path = dir.join("db");
        let log = File::open(&log_path).map_err(|e| io("open", &log_path, e))?;
        log.sync_all().map_err(|e| io("fsync", &log_path, e))?;
        let conf = dir.join("conf");
        if conf.exists() {
            sync_file(&conf)?;
        }
        let blob_dir_path = dir.join("blobs");
        let blob_dir = File::open(&blob_dir_path).map_err(|e| io("open", &blob_dir_path, e))?;
        let mut files = Files {
            log,
            blob_dir_path,
            blob_dir,
            blobs: HashSet::new(),
        };
        files.sync_new_blobs()?;
        files
            .blob_dir
            .sync_all()
            .map_err(|e| io("fsync", &files.blob_dir_path, e))?;
        crate::durable::sync_dir(dir).map_err(|e| io("fsync", dir, e))?;
        crate::durable::sync_parent(dir).map_err(|e| io("fsync the parent of", dir, e))?;
        Ok(Disk {
            db,
            files: Some(Mutex::new(files)),
        })
    }

    /// A temporary database: [`Disk::sync`] only flushes.
    pub fn temporary(db: sled::Db) -> Disk {
        Disk { db, files: None }
    }

    /// Returns once every change committed before the call is on stable storage: sled's
    /// flush, then the new blob files and their directory, then `fdatasync` of the log.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        let Some(files) = &self.files else {
            return Ok(());
        };
        let mut files = files.lock().unwrap_or_else(|e| e.into_inner());
        if files.sync_new_blobs()? {
            let path = &files.blob_dir_path;
            files
                .blob_dir
                .sync_all()
                .map_err(|e| failed(format!("fsync {}", path.display()), e))?;
        }
        files
            .log
            .sync_data()
            .map_err(|e| failed("fdatasync of the log".into(), e))
    }
}

impl Files {
    /// Fsyncs each blob file not synced before; forgets removed ones. Whether there was one.
    fn sync_new_blobs(&mut self) -> Result<bool, StoreError> {
        let fail = |e| failed(self.blob_dir_path.display().to_string(), e);
        let mut now = HashSet::with_capacity(self.blobs.len());
        let mut new = Vec::new();
        for entry in std::fs::read_dir(&self.blob_dir_path).map_err(fail)? {
            let name = entry.map_err(fail)?.file_name();
            if !self.blobs.contains(&name) {
                new.push(name.clone());
            }
            now.insert(name);
        }
        for name in &new {
            let path = self.blob_dir_path.join(name);
            match File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Removed meanwhile (sled drops blobs it no longer needs).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    now.remove(name);
                }
                Err(e) => return Err(fail(e)),
            }
        }
        self.blobs = now;
        Ok(!new.is_empty())
    }
}

/// An I/O error of a sync, with what was being done.
fn failed(what: String, e: std::io::Error) -> StoreError {
    StoreError::Database(Box::new(std::io::Error::new(
        e.kind(),
        format!("{what}: {e}"),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Disk {
        let db = sled::Config::new().path(dir).open().unwrap();
        Disk::open(db, dir).unwrap()
    }

    fn synced_blobs(disk: &Disk) -> usize {
        let files = disk.files.as_ref().unwrap();
        files.lock().unwrap().blobs.len()
    }

    #[test]
    fn a_value_too_big_for_the_log_goes_to_a_blob_file_and_is_synced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let disk = open(&dir);
        disk.sync().unwrap();
        assert_eq!(synced_blobs(&disk), 0);
        disk.db.insert("small", vec![1; 100]).unwrap();
        disk.sync().unwrap();
        assert_eq!(synced_blobs(&disk), 0, "small records stay in the log");
        // Over a quarter of sled's 512 KiB segment: a file of its own under blobs/.
        disk.db.insert("big", vec![7; 300 * 1024]).unwrap();
        disk.sync().unwrap();
        let on_disk = std::fs::read_dir(dir.join("blobs")).unwrap().count();
        assert!(on_disk >= 1, "sled wrote a blob file");
        assert_eq!(synced_blobs(&disk), on_disk, "every blob file synced");
        drop(disk);
        let disk = open(&dir);
        assert_eq!(disk.db.get("big").unwrap().unwrap().len(), 300 * 1024);
    }
}
