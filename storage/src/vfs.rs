//! The file-system seam: every file and folder operation of the log goes
//! through [`Vfs`], so the same code runs on the operating system's files
//! ([`OsFs`], the default) and on [`SimFs`], a model of the page cache in
//! which a simulated power cut keeps only what was synced.
//!
//! The model's contract is the strict POSIX one that a power cut on Linux
//! can exercise: written bytes are durable only after `fdatasync`/`fsync`
//! of their file; a file's creation, rename or deletion is durable only
//! after `fsync` of the folder that holds the entry. Until then a power cut
//! may keep none, some, or all of what was not synced ([`Loss`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How a file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading and writing.
    Existing,
    /// A new file; an error if one exists.
    CreateNew,
    /// Create or empty the file.
    Truncate,
}

/// An open file.
pub trait VFile: fmt::Debug + Send + Sync {
    /// Reads at `pos`; `Ok(0)` at the end.
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `pos`.
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's length.
    fn size(&self) -> io::Result<u64>;
    /// `fdatasync`: the file's bytes and length are durable.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`.
    fn sync_all(&self) -> io::Result<()>;
}

/// Files and folders.
pub trait Vfs: fmt::Debug + Send + Sync {
    /// Creates `dir` and its missing parents; returns the folders created,
    /// outermost first.
    fn create_dir_all(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Names of the entries of `dir`, and whether each is a folder.
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>>;
    /// Opens the file at `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VFile>>;
    /// The whole content of the file at `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Renames a file (replacing `to` if it exists).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Deletes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Deletes an empty folder.
    fn remove_dir(&self, dir: &Path) -> io::Result<()>;
    /// `fsync` of a folder: creations, renames and deletions in it last.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on the file at `path` (created if missing),
    /// held until the returned guard is dropped; `WouldBlock` while another
    /// holder has it. A model of files without other processes may lock
    /// nothing.
    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn Send>>> {
        let _ = path;
        Ok(None)
    }
}

/// The operating system's files.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsFs;

impl VFile for fs::File {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, pos)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, pos)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        fs::File::set_len(self, len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn sync_data(&self) -> io::Result<()> {
        fs::File::sync_data(self)
    }
    fn sync_all(&self) -> io::Result<()> {
        fs::File::sync_all(self)
    }
}

impl Vfs for OsFs {
    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn Send>>> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(Box::new(f))),
            Err(fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
            .map(Path::to_path_buf)
            .collect();
        fs::create_dir_all(dir)?;
        Ok(missing.into_iter().rev().collect())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            out.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.file_type()?.is_dir(),
            ));
        }
        Ok(out)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VFile>> {
        let mut o = fs::OpenOptions::new();
        o.read(true).write(true);
        match mode {
            OpenMode::Existing => {}
            OpenMode::CreateNew => {
                o.create_new(true);
            }
            OpenMode::Truncate => {
                o.create(true).truncate(true);
            }
        }
        Ok(Arc::new(o.open(path)?))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn remove_dir(&self, dir: &Path) -> io::Result<()> {
        fs::remove_dir(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        fs::File::open(dir)?.sync_all()
    }
}

/// What a simulated power cut keeps of the writes that were not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Nothing: every file is as last synced.
    All,
    /// A prefix of each file's unsynced writes in the order they were made,
    /// the last one kept only in part (a torn write); seeded.
    Prefix(u64),
    /// Each unsynced 4 KiB page on its own, in no order, and either the old
    /// or the new length, as a page cache writing back on its own does;
    /// seeded.
    Pages(u64),
}

/// Page size of [`Loss::Pages`].
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(usize),
}

#[derive(Clone, Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// Changes since the last sync, in order.
    pending: Vec<Pending>,
}

#[derive(Debug, Default)]
struct State {
    /// Every path that exists now.
    live: BTreeMap<PathBuf, Node>,
    /// The entries a power cut keeps.
    durable: BTreeMap<PathBuf, Node>,
    inodes: Vec<Inode>,
    /// The power is off: every operation fails.
    off: bool,
    /// Operations that change something, counted; the power goes off
    /// when the count reaches `cut_at`.
    changes: u64,
    cut_at: Option<u64>,
    /// Syncs of files whose path ends with one of these, or of the folder
    /// that is one of these, are ignored: a disk that lies (to show that a
    /// missing sync is caught).
    lying: Vec<String>,
    /// The changes made, for a failing test to show (the last 2 000).
    history: Vec<String>,
}

/// A model of files in the page cache: see the module documentation.
/// Cheap to clone; clones share the files.
#[derive(Clone, Debug)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
    gate: Arc<Gate>,
    /// False once the process using this handle died (see
    /// [`SimFs::crash_process`]).
    alive: Arc<AtomicBool>,
}

impl Default for SimFs {
    fn default() -> SimFs {
        SimFs {
            state: Arc::default(),
            gate: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// Deletions held back by a test, to force an interleaving.
#[derive(Debug, Default)]
struct Gate {
    /// Paths whose deletion waits, and whether someone waits for it.
    held: Mutex<BTreeMap<PathBuf, bool>>,
    changed: Condvar,
}

#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    ino: usize,
    path: PathBuf,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or folder", path.display()),
    )
}

fn power_off() -> io::Error {
    io::Error::other("the power is off")
}

fn process_gone() -> io::Error {
    io::Error::other("the process using this file system died")
}

/// SplitMix64, for the seeded choices of a power cut.
fn next(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn apply(data: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(pos, bytes) => {
            let end = *pos as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*pos as usize..end].copy_from_slice(bytes);
        }
        Pending::SetLen(len) => data.resize(*len as usize, 0),
    }
}

impl State {
    /// Counts a change; fails if the power is (or now goes) off.
    fn change(&mut self, what: impl FnOnce() -> String) -> io::Result<()> {
        if self.off {
            return Err(power_off());
        }
        self.changes += 1;
        if self.cut_at.is_some_and(|c| self.changes > c) {
            self.off = true;
            self.note("power cut before: ".to_owned() + &what());
            return Err(power_off());
        }
        self.note(what());
        Ok(())
    }

    fn note(&mut self, what: String) {
        if self.history.len() >= 2000 {
            self.history.drain(..1000);
        }
        self.history.push(what);
    }

    fn check_on(&self) -> io::Result<()> {
        if self.off { Err(power_off()) } else { Ok(()) }
    }

    fn lies_about(&self, path: &Path, folder: bool) -> bool {
        let p = path.to_string_lossy();
        self.lying.iter().any(|l| {
            if folder {
                p == l.as_str()
            } else {
                p.ends_with(l.as_str())
            }
        })
    }

    fn parent_is_dir(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(p) if p.as_os_str().is_empty() || p == Path::new("/") => Ok(()),
            Some(p) if self.live.get(p) == Some(&Node::Dir) => Ok(()),
            _ => Err(not_found(path)),
        }
    }
}

impl SimFs {
    /// An empty file system, the power on.
    pub fn new() -> SimFs {
        SimFs::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, if the process using this handle is alive.
    fn live_state(&self) -> io::Result<MutexGuard<'_, State>> {
        if self.alive.load(Ordering::Acquire) {
            Ok(self.lock())
        } else {
            Err(process_gone())
        }
    }

    /// The process using this file system dies (as by SIGKILL) while the
    /// machine stays up: every file and folder stays as it is, synced or
    /// not (the page cache survives), and this handle, its clones and the
    /// files opened through them fail from now on; a power cut armed with
    /// [`cut_after`](SimFs::cut_after) is disarmed. Returns a handle for
    /// the next process.
    pub fn crash_process(&self) -> SimFs {
        self.alive.store(false, Ordering::Release);
        self.lock().cut_at = None;
        SimFs {
            state: self.state.clone(),
            gate: self.gate.clone(),
            alive: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The power goes off after `changes` more changing operations (writes,
    /// syncs, creations, renames, deletions): that one and every later
    /// operation fails.
    pub fn cut_after(&self, changes: u64) {
        let mut s = self.lock();
        s.cut_at = Some(s.changes + changes);
    }

    /// Deleting `path` waits from now on, until [`release`](SimFs::release).
    pub fn hold_deletion_of(&self, path: &Path) {
        self.gate_lock().insert(path.to_path_buf(), false);
    }

    /// Waits (at most `within`) until a deletion of `path` is held back;
    /// whether one is.
    pub fn deletion_waits(&self, path: &Path, within: Duration) -> bool {
        let held = self.gate_lock();
        let (held, _) = self
            .gate
            .changed
            .wait_timeout_while(held, within, |h| h.get(path) != Some(&true))
            .unwrap_or_else(PoisonError::into_inner);
        held.get(path) == Some(&true)
    }

    /// Lets the held deletion of `path` go on.
    pub fn release(&self, path: &Path) {
        self.gate_lock().remove(path);
        self.gate.changed.notify_all();
    }

    fn gate_lock(&self) -> MutexGuard<'_, BTreeMap<PathBuf, bool>> {
        self.gate
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Cuts the power now.
    pub fn cut_now(&self) {
        self.lock().off = true;
    }

    /// Whether the power is off.
    pub fn is_off(&self) -> bool {
        self.lock().off
    }

    /// The latest changes, oldest first, across power cuts (for the report
    /// of a failing test).
    pub fn history(&self) -> Vec<String> {
        self.lock().history.clone()
    }

    /// Ignores the syncs of files whose path ends with `part`, and of the
    /// folder whose path is `part`.
    pub fn lie_about_syncs_of(&self, part: &str) {
        self.lock().lying.push(part.to_owned());
    }

    /// What the disk holds after a power cut (cutting it if still on): a
    /// new file system, powered on, of the durable entries and content,
    /// plus what `loss` keeps of the rest.
    pub fn after_power_cut(&self, loss: Loss) -> SimFs {
        let mut s = self.lock();
        s.off = true;
        s.note(format!("power off, the disk keeps: {loss:?}"));
        let mut seed = match loss {
            Loss::All => 0,
            Loss::Prefix(x) | Loss::Pages(x) => x,
        };
        // Only entries whose every ancestor folder survived are reachable.
        let durable: BTreeMap<PathBuf, Node> = s
            .durable
            .iter()
            .filter(|(p, _)| {
                p.ancestors()
                    .skip(1)
                    .take_while(|a| !a.as_os_str().is_empty() && *a != Path::new("/"))
                    .all(|a| s.durable.get(a) == Some(&Node::Dir))
            })
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        let inodes = s
            .inodes
            .iter()
            .map(|i| {
                let data = match loss {
                    Loss::All => i.durable.clone(),
                    Loss::Prefix(_) => {
                        let mut d = i.durable.clone();
                        let keep = next(&mut seed) % (i.pending.len() as u64 + 1);
                        for p in &i.pending[..keep as usize] {
                            apply(&mut d, p);
                        }
                        if let Some(Pending::Write(pos, bytes)) = i.pending.get(keep as usize) {
                            let part = next(&mut seed) % (bytes.len() as u64 + 1);
                            apply(
                                &mut d,
                                &Pending::Write(*pos, bytes[..part as usize].to_vec()),
                            );
                        }
                        d
                    }
                    Loss::Pages(_) => {
                        if i.pending.is_empty() {
                            i.durable.clone()
                        } else {
                            let len = if next(&mut seed).is_multiple_of(2) {
                                i.durable.len()
                            } else {
                                i.data.len()
                            };
                            let mut d = vec![0; len];
                            let old = i.durable.len().min(len);
                            d[..old].copy_from_slice(&i.durable[..old]);
                            for start in (0..len as u64).step_by(PAGE as usize) {
                                let end = (start + PAGE).min(len as u64) as usize;
                                let start = start as usize;
                                let newer = i.data.get(start..end.min(i.data.len()));
                                let changed = newer != i.durable.get(start..end);
                                if changed && next(&mut seed).is_multiple_of(2) {
                                    d[start..end].fill(0);
                                    if let Some(n) = newer {
                                        d[start..start + n.len()].copy_from_slice(n);
                                    }
                                }
                            }
                            d
                        }
                    }
                };
                Inode {
                    durable: data.clone(),
                    data,
                    pending: Vec::new(),
                }
            })
            .collect();
        SimFs {
            state: Arc::new(Mutex::new(State {
                live: durable.clone(),
                durable,
                inodes,
                off: false,
                changes: 0,
                cut_at: None,
                lying: s.lying.clone(),
                history: s.history.clone(),
            })),
            gate: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl VFile for SimFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let s = self.fs.live_state()?;
        s.check_on()?;
        let data = &s.inodes[self.ino].data;
        let pos = (pos as usize).min(data.len());
        let n = buf.len().min(data.len() - pos);
        buf[..n].copy_from_slice(&data[pos..pos + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        let mut s = self.fs.live_state()?;
        s.change(|| format!("write {} +{pos} {}", self.path.display(), buf.len()))?;
        let p = Pending::Write(pos, buf.to_vec());
        let i = &mut s.inodes[self.ino];
        apply(&mut i.data, &p);
        i.pending.push(p);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.fs.live_state()?;
        s.change(|| format!("set_len {} {len}", self.path.display()))?;
        let p = Pending::SetLen(len);
        let i = &mut s.inodes[self.ino];
        apply(&mut i.data, &p);
        i.pending.push(p);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        let s = self.fs.live_state()?;
        s.check_on()?;
        Ok(s.inodes[self.ino].data.len() as u64)
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.fs.live_state()?;
        s.change(|| format!("sync {}", self.path.display()))?;
        if !s.lies_about(&self.path, false) {
            let i = &mut s.inodes[self.ino];
            i.durable = i.data.clone();
            i.pending.clear();
        }
        Ok(())
    }
    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
}

impl Vfs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut s = self.live_state()?;
        s.check_on()?;
        let mut created = Vec::new();
        let mut ancestors: Vec<&Path> = dir
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && *a != Path::new("/"))
            .collect();
        ancestors.reverse();
        for a in ancestors {
            match s.live.get(a) {
                Some(Node::Dir) => {}
                Some(Node::File(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} is a file", a.display()),
                    ));
                }
                None => {
                    s.change(|| format!("mkdir {}", a.display()))?;
                    s.live.insert(a.to_path_buf(), Node::Dir);
                    created.push(a.to_path_buf());
                }
            }
        }
        Ok(created)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let s = self.live_state()?;
        s.check_on()?;
        if s.live.get(dir) != Some(&Node::Dir) {
            return Err(not_found(dir));
        }
        Ok(s.live
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .filter_map(|(p, n)| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                Some((name, *n == Node::Dir))
            })
            .collect())
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VFile>> {
        let mut s = self.live_state()?;
        s.check_on()?;
        let ino = match (s.live.get(path).copied(), mode) {
            (Some(Node::Dir), _) => {
                return Err(io::Error::other(format!("{} is a folder", path.display())));
            }
            (Some(Node::File(_)), OpenMode::CreateNew) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            (Some(Node::File(ino)), OpenMode::Existing) => ino,
            (Some(Node::File(ino)), OpenMode::Truncate) => {
                s.change(|| format!("truncate {}", path.display()))?;
                let i = &mut s.inodes[ino];
                i.data.clear();
                i.pending.push(Pending::SetLen(0));
                ino
            }
            (None, OpenMode::Existing) => return Err(not_found(path)),
            (None, OpenMode::CreateNew | OpenMode::Truncate) => {
                s.parent_is_dir(path)?;
                s.change(|| format!("create {}", path.display()))?;
                s.inodes.push(Inode::default());
                let ino = s.inodes.len() - 1;
                s.live.insert(path.to_path_buf(), Node::File(ino));
                ino
            }
        };
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
            path: path.to_path_buf(),
        }))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.live_state()?;
        s.check_on()?;
        match s.live.get(path) {
            Some(Node::File(ino)) => Ok(s.inodes[*ino].data.clone()),
            _ => Err(not_found(path)),
        }
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.live_state()?;
        s.check_on()?;
        let Some(n @ Node::File(_)) = s.live.get(from).copied() else {
            return Err(not_found(from));
        };
        s.parent_is_dir(to)?;
        s.change(|| format!("rename {} {}", from.display(), to.display()))?;
        s.live.remove(from);
        s.live.insert(to.to_path_buf(), n);
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        {
            let mut held = self.gate_lock();
            if let Some(waiting) = held.get_mut(path) {
                *waiting = true;
                self.gate.changed.notify_all();
                drop(
                    self.gate
                        .changed
                        .wait_while(held, |h| h.contains_key(path))
                        .unwrap_or_else(PoisonError::into_inner),
                );
            }
        }
        let mut s = self.live_state()?;
        s.check_on()?;
        let Some(Node::File(_)) = s.live.get(path) else {
            return Err(not_found(path));
        };
        s.change(|| format!("unlink {}", path.display()))?;
        s.live.remove(path);
        Ok(())
    }
    fn remove_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.live_state()?;
        s.check_on()?;
        let Some(Node::Dir) = s.live.get(dir) else {
            return Err(not_found(dir));
        };
        if s.live.keys().any(|p| p.parent() == Some(dir)) {
            return Err(io::Error::new(
                io::ErrorKind::DirectoryNotEmpty,
                format!("{} is not empty", dir.display()),
            ));
        }
        s.change(|| format!("rmdir {}", dir.display()))?;
        s.live.remove(dir);
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.live_state()?;
        s.check_on()?;
        if s.live.get(dir) != Some(&Node::Dir) && dir != Path::new("/") {
            return Err(not_found(dir));
        }
        s.change(|| format!("sync folder {}", dir.display()))?;
        if s.lies_about(dir, true) {
            return Ok(());
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        s.durable.retain(|p, _| !in_dir(p));
        let entries: Vec<(PathBuf, Node)> = s
            .live
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        s.durable.extend(entries);
        Ok(())
    }
}
