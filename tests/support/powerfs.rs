//! A disk that loses power: a FUSE file system, kept in this process's memory, that forgets
//! every write that was not synced (in the manner of LazyFS). Used by `tests/power_loss.rs`.
//!
//! Each file and directory has two states: what reads see now, and what is durable (what a
//! disk that honours flushes holds after a power cut). Only syncs move the one to the other:
//!
//! - `fsync`/`fdatasync` of a file makes its contents, size and mode durable;
//! - `fsync` of a directory makes its entries durable: the files and directories created,
//!   renamed into it or removed from it since its last sync.
//!
//! Nothing else does: not `close`, not `sync_file_range` (it only writes back the kernel's
//! page cache, and every write here goes straight to this process: `direct_io`), not time.
//! The model is the strict one POSIX allows and LazyFS implements: a new file whose directory
//! was not synced is gone after the cut even if the file itself was synced.
//!
//! [`PowerLossDisk::cut_power`] is the power cut: from that instant every operation fails
//! (nothing more reaches the "disk"); [`PowerLossDisk::power_on`] unmounts and mounts what
//! was durable: the tree reachable from the root through durable entries, each file with its
//! durable contents.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

/// How long the kernel may cache names and attributes (this file system is the only writer).
const TTL: Duration = Duration::from_secs(1);

/// One version of a file or directory.
#[derive(Clone)]
struct Content {
    perm: u16,
    data: Vec<u8>,
    entries: BTreeMap<OsString, u64>,
}

struct Node {
    dir: bool,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    now: Content,
    durable: Content,
}

impl Node {
    fn new(dir: bool, perm: u16, uid: u32, gid: u32) -> Node {
        let empty = Content {
            perm,
            data: Vec::new(),
            entries: BTreeMap::new(),
        };
        Node {
            dir,
            uid,
            gid,
            mtime: SystemTime::now(),
            now: empty.clone(),
            durable: empty,
        }
    }
}

/// Counts of what reached the file system, for the test's messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub writes: u64,
    pub file_syncs: u64,
    pub dir_syncs: u64,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// The power is off: every operation fails.
    off: bool,
    counts: Counts,
}

impl State {
    fn empty() -> State {
        let mut nodes = HashMap::new();
        nodes.insert(1, Node::new(true, 0o755, 0, 0));
        State {
            nodes,
            next_ino: 2,
            off: false,
            counts: Counts::default(),
        }
    }

    /// What a power cut leaves: the durable tree, durable contents, everything durable.
    fn after_cut(&self) -> State {
        let mut nodes = HashMap::new();
        let mut todo = vec![1u64];
        while let Some(ino) = todo.pop() {
            if nodes.contains_key(&ino) {
                continue;
            }
            let Some(node) = self.nodes.get(&ino) else {
                continue;
            };
            todo.extend(node.durable.entries.values().copied());
            nodes.insert(
                ino,
                Node {
                    dir: node.dir,
                    uid: node.uid,
                    gid: node.gid,
                    mtime: node.mtime,
                    now: node.durable.clone(),
                    durable: node.durable.clone(),
                },
            );
        }
        State {
            nodes,
            next_ino: self.next_ino,
            off: false,
            counts: Counts::default(),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.nodes.get(&ino)?;
        let size = if node.dir {
            4096
        } else {
            node.now.data.len() as u64
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind: if node.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: node.now.perm,
            nlink: if node.dir { 2 } else { 1 },
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        let dir = self.nodes.get(&parent).ok_or(Errno::ENOENT)?;
        if !dir.dir {
            return Err(Errno::ENOTDIR);
        }
        dir.now.entries.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn make(
        &mut self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        mode: u32,
        umask: u32,
        req: &Request,
    ) -> Result<FileAttr, Errno> {
        match self.child(parent, name) {
            Ok(_) => return Err(Errno::EEXIST),
            Err(e) if e != Errno::ENOENT => return Err(e),
            Err(_) => {}
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let perm = (mode & !umask & 0o7777) as u16;
        self.nodes
            .insert(ino, Node::new(dir, perm, req.uid(), req.gid()));
        let parent = self.nodes.get_mut(&parent).ok_or(Errno::ENOENT)?;
        parent.now.entries.insert(name.to_owned(), ino);
        parent.mtime = SystemTime::now();
        self.attr(ino).ok_or(Errno::EIO)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name)?;
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        match (dir, node.dir) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !node.now.entries.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        let parent = self.nodes.get_mut(&parent).ok_or(Errno::ENOENT)?;
        parent.now.entries.remove(name);
        parent.mtime = SystemTime::now();
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.child(parent, name)?;
        match self.child(newparent, newname) {
            Ok(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => return Err(Errno::EEXIST),
            Ok(target) => {
                let target = self.nodes.get(&target).ok_or(Errno::ENOENT)?;
                let moving_dir = self.nodes.get(&ino).is_some_and(|n| n.dir);
                if target.dir && (!moving_dir || !target.now.entries.is_empty()) {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            Err(e) if e != Errno::ENOENT => return Err(e),
            Err(_) => {}
        }
        let now = SystemTime::now();
        let from = self.nodes.get_mut(&parent).ok_or(Errno::ENOENT)?;
        from.now.entries.remove(name);
        from.mtime = now;
        let to = self.nodes.get_mut(&newparent).ok_or(Errno::ENOENT)?;
        to.now.entries.insert(newname.to_owned(), ino);
        to.mtime = now;
        Ok(())
    }

    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        node.durable = node.now.clone();
        if node.dir {
            self.counts.dir_syncs += 1;
        } else {
            self.counts.file_syncs += 1;
        }
        Ok(())
    }
}

/// The FUSE side: every call locks the state.
struct PowerFs(Arc<Mutex<State>>);

impl PowerFs {
    /// The state, or EIO once the power is off.
    fn on(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let state = lock(&self.0);
        if state.off {
            Err(Errno::EIO)
        } else {
            Ok(state)
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

macro_rules! answer {
    ($reply:ident, $result:expr, |$ok:ident| $done:expr) => {
        match $result {
            Ok($ok) => $done,
            Err(e) => $reply.error(e),
        }
    };
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.on().and_then(|s| {
            let ino = s.child(parent.0, name)?;
            s.attr(ino).ok_or(Errno::ENOENT)
        });
        answer!(reply, result, |attr| reply.entry(
            &TTL,
            &attr,
            Generation(0)
        ))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let result = self.on().and_then(|s| s.attr(ino.0).ok_or(Errno::ENOENT));
        answer!(reply, result, |attr| reply.attr(&TTL, &attr))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _ = req;
        let result = self.on().and_then(|mut s| {
            let node = s.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(mode) = mode {
                node.now.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = uid {
                node.uid = uid;
            }
            if let Some(gid) = gid {
                node.gid = gid;
            }
            if let Some(size) = size {
                if node.dir {
                    return Err(Errno::EISDIR);
                }
                node.now.data.resize(size as usize, 0);
            }
            node.mtime = SystemTime::now();
            s.attr(ino.0).ok_or(Errno::ENOENT)
        });
        answer!(reply, result, |attr| reply.attr(&TTL, &attr))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & 0o170000 != 0o100000 {
            return reply.error(Errno::EPERM);
        }
        let result = self
            .on()
            .and_then(|mut s| s.make(parent.0, name, false, mode, umask, req));
        answer!(reply, result, |attr| reply.entry(
            &TTL,
            &attr,
            Generation(0)
        ))
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self
            .on()
            .and_then(|mut s| s.make(parent.0, name, true, mode, umask, req));
        answer!(reply, result, |attr| reply.entry(
            &TTL,
            &attr,
            Generation(0)
        ))
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.on().and_then(|mut s| s.remove(parent.0, name, false));
        answer!(reply, result, |_ok| reply.ok())
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.on().and_then(|mut s| s.remove(parent.0, name, true));
        answer!(reply, result, |_ok| reply.ok())
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self
            .on()
            .and_then(|mut s| s.rename(parent.0, name, newparent.0, newname, flags));
        answer!(reply, result, |_ok| reply.ok())
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.on().and_then(|s| s.attr(ino.0).ok_or(Errno::ENOENT));
        answer!(reply, result, |_attr| reply
            .opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO))
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.on().and_then(|s| {
            let node = s.nodes.get(&ino.0).ok_or(Errno::ENOENT)?;
            let data = &node.now.data;
            let start = (offset as usize).min(data.len());
            let end = start.saturating_add(size as usize).min(data.len());
            Ok(data[start..end].to_vec())
        });
        answer!(reply, result, |data| reply.data(&data))
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.on().and_then(|mut s| {
            s.counts.writes += 1;
            let node = s.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            let offset = offset as usize;
            let end = offset + data.len();
            if node.now.data.len() < end {
                node.now.data.resize(end, 0);
            }
            node.now.data[offset..end].copy_from_slice(data);
            node.mtime = SystemTime::now();
            Ok(data.len() as u32)
        });
        answer!(reply, result, |n| reply.written(n))
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.on().and_then(|mut s| s.sync(ino.0));
        answer!(reply, result, |_ok| reply.ok())
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = self.on().and_then(|s| {
            let node = s.nodes.get(&ino.0).ok_or(Errno::ENOENT)?;
            if !node.dir {
                return Err(Errno::ENOTDIR);
            }
            let mut all = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (1, FileType::Directory, OsString::from("..")),
            ];
            for (name, child) in &node.now.entries {
                let dir = s.nodes.get(child).is_some_and(|n| n.dir);
                let kind = if dir {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                all.push((*child, kind, name.clone()));
            }
            Ok(all)
        });
        answer!(reply, result, |all| {
            for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.on().and_then(|mut s| s.sync(ino.0));
        answer!(reply, result, |_ok| reply.ok())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self
            .on()
            .and_then(|mut s| s.make(parent.0, name, false, mode, umask, req));
        answer!(reply, result, |attr| reply.created(
            &TTL,
            &attr,
            Generation(0),
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO
        ))
    }
}

/// The FUSE file system mounted on a private directory of this process.
pub struct PowerLossDisk {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl PowerLossDisk {
    /// Mounts an empty file system. Panics, with what to do, where FUSE cannot be mounted:
    /// this test never skips.
    pub fn mount() -> PowerLossDisk {
        let dir = tempfile::tempdir().expect("temp dir");
        let mountpoint = dir.path().join("disk");
        std::fs::create_dir(&mountpoint).expect("mountpoint");
        let mut disk = PowerLossDisk {
            state: Arc::new(Mutex::new(State::empty())),
            session: None,
            mountpoint,
            _dir: dir,
        };
        disk.attach();
        disk
    }

    fn attach(&mut self) {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("authd-powerloss".into()),
            fuser::MountOption::RW,
        ];
        let session = fuser::spawn_mount(PowerFs(self.state.clone()), &self.mountpoint, &config)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot mount the power-loss FUSE file system on {}: {e}. It needs /dev/fuse \
                     (exists: {}) and either root or fusermount3 (Debian: apt-get install fuse3; \
                     .ci/run installs it)",
                    self.mountpoint.display(),
                    Path::new("/dev/fuse").exists()
                )
            });
        self.session = Some(session);
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Makes everything durable, as `sync` and time would on a real disk (sets up a data
    /// directory before a scenario starts).
    pub fn sync_everything(&self) {
        let mut s = lock(&self.state);
        for node in s.nodes.values_mut() {
            node.durable = node.now.clone();
        }
    }

    /// What reached the file system since it was (re)mounted.
    pub fn counts(&self) -> Counts {
        lock(&self.state).counts
    }

    /// The power cut: from now on nothing reaches the disk and every operation fails.
    pub fn cut_power(&self) {
        lock(&self.state).off = true;
    }

    /// Unmounts (every process using the file system must be gone) and mounts what was
    /// durable at the cut.
    pub fn power_on(&mut self) {
        assert!(lock(&self.state).off, "power_on without cut_power");
        self.detach();
        let after = lock(&self.state).after_cut();
        self.state = Arc::new(Mutex::new(after));
        self.attach();
    }

    fn detach(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                // Busy (a dying process still holds a file): detach lazily.
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
                eprintln!(
                    "unmount of {}: {e}; detached lazily",
                    self.mountpoint.display()
                );
            }
        }
    }
}

impl Drop for PowerLossDisk {
    fn drop(&mut self) {
        lock(&self.state).off = true;
        self.detach();
    }
}
