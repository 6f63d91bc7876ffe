//! The embedded backend: one folder per topic-partition under a root folder
//! (`<root>/<topic>/<partition>/`), each holding segment files, and one
//! journal beside them (`<root>/journal-<n>.wal`) written by the log's one
//! writer; opened and recovered at start-up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use tokio::sync::{oneshot, watch};

use crate::batch::MAX_ON_DISK;
use crate::config::{FsyncPolicy, LogConfig};
use crate::error::{Error, Result};
use crate::journal::{self, Active, JournalFile};
use crate::log::{AppendAck, Log, Offsets};
use crate::partition::{AppendRequest, Partition, Vouched, sync_dir};
use crate::record::{Record, StoredRecord, TopicPartition, validate_topic_name};
use crate::segment::ReadBudget;
use crate::vfs::{OpenMode, OsFs, Vfs};
use crate::writer::{Job, Writer};

/// The embedded log: segment files on local disk. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    fs: Arc<dyn Vfs>,
    root: PathBuf,
    config: Arc<LogConfig>,
    partitions: RwLock<HashMap<TopicPartition, Arc<Partition>>>,
    create: tokio::sync::Mutex<()>,
    /// What journal entries put before a partition's `<topic>/<partition>`
    /// (the log's folder relative to the journal's, and a slash).
    jprefix: String,
    /// The writer this log shares with the others of its group.
    writer: Arc<Writer>,
    closed: AtomicBool,
    /// Set to the cause by the first write or sync that failed.
    failed: Arc<watch::Sender<Option<String>>>,
}

impl Drop for Inner {
    /// The last handle gone without `close`: let the writer finish what is
    /// queued and stop, once no log of the group is open.
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel)
            && self.writer.open_logs.fetch_sub(1, Ordering::AcqRel) == 1
        {
            self.writer.stop();
        }
    }
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

fn check_config(c: &LogConfig) -> Result<()> {
    let bad = |field, reason: &str| {
        Err(Error::InvalidConfig {
            field,
            reason: reason.to_owned(),
        })
    };
    if c.segment_bytes < 4096 || c.segment_bytes > 1 << 31 {
        return bad("segment_bytes", "must be between 4 KiB and 2 GiB");
    }
    if c.index_interval_bytes == 0 {
        return bad("index_interval_bytes", "must be at least 1");
    }
    if c.max_record_bytes == 0 || c.max_record_bytes > c.max_batch_bytes {
        return bad(
            "max_record_bytes",
            "must be at least 1 and at most max_batch_bytes",
        );
    }
    if c.max_batch_bytes > MAX_ON_DISK {
        return bad("max_batch_bytes", "must be at most 1 GiB");
    }
    if c.journal_bytes < 4096 {
        return bad("journal_bytes", "must be at least 4 KiB");
    }
    if c.max_group_bytes == 0 || c.append_queue == 0 {
        return bad(
            "max_group_bytes",
            "max_group_bytes and append_queue must be at least 1",
        );
    }
    Ok(())
}

/// Lists the entries of `dir` that are folders.
fn subdirs(fs: &dyn Vfs, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(fs
        .list(dir)
        .map_err(Error::io("list", dir))?
        .into_iter()
        .filter(|(_, is_dir)| *is_dir)
        .map(|(name, _)| {
            let path = dir.join(&name);
            (name, path)
        })
        .collect())
}

/// The folder holding `path` (`.` for a bare relative name).
fn parent_of(path: &Path) -> Option<&Path> {
    path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    })
}

/// Creates `dir` and its missing parents, and syncs the folder holding
/// each one created, so that the new folders outlast a power cut.
fn create_dirs(fs: &dyn Vfs, dir: &Path) -> Result<()> {
    let created = fs
        .create_dir_all(dir)
        .map_err(Error::io("create folder", dir))?;
    for d in created {
        if let Some(parent) = parent_of(&d) {
            sync_dir(fs, parent)?;
        }
    }
    Ok(())
}

/// The file that marks a partition's folder as being deleted.
const DELETED_MARK: &str = "deleted";

/// Deletes a partition's folder: a durable mark first, then its files,
/// then the folder; a crash half way leaves a marked folder that the next
/// open finishes deleting, never a partition with files missing. With
/// `topic_too`, the topic's folder goes too once it is empty.
fn remove_partition_dir(fs: &dyn Vfs, dir: &Path, topic_too: bool) -> Result<()> {
    let mark = dir.join(DELETED_MARK);
    let listed = |fs: &dyn Vfs| fs.list(dir).map_err(Error::io("list", dir));
    if !listed(fs)?.iter().any(|(n, _)| n == DELETED_MARK) {
        let f = fs
            .open(&mark, OpenMode::Truncate)
            .map_err(Error::io("create", &mark))?;
        f.sync_all().map_err(Error::io("fsync", &mark))?;
        sync_dir(fs, dir)?;
    }
    for (name, is_dir) in listed(fs)? {
        if !is_dir && name != DELETED_MARK {
            let path = dir.join(&name);
            match fs.remove_file(&path) {
                // (gone meanwhile: a retention pass that read the list first)
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io("delete", &path)(e));
                }
                _ => {}
            }
        }
    }
    sync_dir(fs, dir)?;
    fs.remove_file(&mark).map_err(Error::io("delete", &mark))?;
    fs.remove_dir(dir)
        .map_err(Error::io("delete folder", dir))?;
    if let Some(topic) = parent_of(dir) {
        sync_dir(fs, topic)?;
        if !topic_too {
            return Ok(());
        }
        match fs.remove_dir(topic) {
            Ok(()) => {
                if let Some(root) = parent_of(topic) {
                    sync_dir(fs, root)?;
                }
            }
            // other partitions of the topic are still there
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {}
            Err(e) => return Err(Error::io("delete folder", topic)(e)),
        }
    }
    Ok(())
}

/// How long opening waits for another open log of the same folder (one
/// being dropped, say) to let go of it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Takes the lock file `journal.lock` in `dir` (created with its folder if
/// missing): one open log group per folder, in this process or any other.
async fn lock_folder(fs: &dyn Vfs, dir: &Path) -> Result<Option<Box<dyn Send>>> {
    create_dirs(fs, dir)?;
    let path = dir.join("journal.lock");
    let start = std::time::Instant::now();
    loop {
        match fs.lock(&path) {
            Ok(guard) => return Ok(guard),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < LOCK_WAIT => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Error::io("lock", &path)(std::io::Error::other(
                    "another open log holds this folder (is another coordinator using it?)",
                )));
            }
            Err(e) => return Err(Error::io("lock", &path)(e)),
        }
    }
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

impl EmbeddedLog {
    /// Opens the log under `root` (creating the folder if needed), recovering
    /// every partition found there. Must run inside a Tokio runtime.
    pub async fn open(root: impl Into<PathBuf>, config: LogConfig) -> Result<EmbeddedLog> {
        EmbeddedLog::open_on(Arc::new(OsFs), root, config).await
    }

    /// [`open`](EmbeddedLog::open) on the files of `fs` (the operating
    /// system's, or a model of them in tests).
    pub async fn open_on(
        fs: Arc<dyn Vfs>,
        root: impl Into<PathBuf>,
        config: LogConfig,
    ) -> Result<EmbeddedLog> {
        let mut logs = EmbeddedLog::open_group_on(fs, root, vec![(String::new(), config)]).await?;
        Ok(logs.remove(0))
    }

    /// Opens logs in the folders `dir/<name>` (each as
    /// [`open`](EmbeddedLog::open) would) that share one journal in `dir`
    /// and one writer, so that one `fdatasync` covers the appends of all
    /// of them. The first log's journal and group-commit settings
    /// (`journal_bytes`, `direct_write_bytes`, `max_group_bytes`,
    /// `append_queue`) apply to the group; the writer syncs at the shortest
    /// interval any log asks for. A failure of the writer fails them all.
    pub async fn open_group(
        dir: impl Into<PathBuf>,
        logs: Vec<(String, LogConfig)>,
    ) -> Result<Vec<EmbeddedLog>> {
        EmbeddedLog::open_group_on(Arc::new(OsFs), dir, logs).await
    }

    /// [`open_group`](EmbeddedLog::open_group) on the files of `fs`.
    pub async fn open_group_on(
        fs: Arc<dyn Vfs>,
        dir: impl Into<PathBuf>,
        logs: Vec<(String, LogConfig)>,
    ) -> Result<Vec<EmbeddedLog>> {
        if logs.is_empty() {
            return Err(Error::InvalidConfig {
                field: "logs",
                reason: "a group needs at least one log".into(),
            });
        }
        for (name, config) in &logs {
            check_config(config)?;
            if !name.is_empty() {
                validate_topic_name(name).map_err(|_| Error::InvalidConfig {
                    field: "logs",
                    reason: format!("{name:?} is not a folder name a log can have"),
                })?;
            }
        }
        let dir = dir.into();
        let members: Vec<(PathBuf, String, Arc<LogConfig>)> = logs
            .into_iter()
            .map(|(name, config)| {
                let (root, prefix) = if name.is_empty() {
                    (dir.clone(), String::new())
                } else {
                    (dir.join(&name), format!("{name}/"))
                };
                (root, prefix, Arc::new(config))
            })
            .collect();
        let failed = Arc::new(watch::channel(None).0);
        let lock = lock_folder(&*fs, &dir).await?;
        let (vfs, d, m) = (fs.clone(), dir.clone(), members.clone());
        let opened = tokio::task::spawn_blocking(move || -> Result<_> {
            create_dirs(&*vfs, &d)?;
            // A process that crashed (the machine still up) may have left
            // folder entries nobody synced: sync the chain of folders
            // before serving anything (each partition syncs its own).
            if let Some(parent) = parent_of(&d) {
                sync_dir(&*vfs, parent)?;
            }
            sync_dir(&*vfs, &d)?;
            for (root, _, _) in &m {
                if *root != d {
                    create_dirs(&*vfs, root)?;
                    sync_dir(&*vfs, root)?;
                }
            }
            let redo = journal::recover(&*vfs, &d)?;
            if redo.redone > 0 {
                tracing::info!(folder = %d.display(), batches = redo.redone,
                    "journal redone into the segment files");
            }
            let mut opened = Vec::new();
            let mut per_log = Vec::new();
            for (root, prefix, config) in &m {
                let mut mine = Vec::new();
                for (topic, tdir) in subdirs(&*vfs, root)? {
                    if validate_topic_name(&topic).is_err() {
                        tracing::warn!(folder = %tdir.display(), "ignoring folder that is not a topic");
                        continue;
                    }
                    for (part, pdir) in subdirs(&*vfs, &tdir)? {
                        let Ok(partition) = part.parse::<u32>() else {
                            tracing::warn!(folder = %pdir.display(), "ignoring folder that is not a partition");
                            continue;
                        };
                        let marked = vfs
                            .list(&pdir)
                            .map_err(Error::io("list", &pdir))?
                            .iter()
                            .any(|(n, _)| n == DELETED_MARK);
                        if marked {
                            // deleted when the log stopped: finished now
                            remove_partition_dir(&*vfs, &pdir, false)?;
                            continue;
                        }
                        let tp = TopicPartition::new(topic.clone(), partition);
                        let jdir = format!("{prefix}{topic}/{partition}");
                        let vouched = match (redo.found, redo.vouched.get(&jdir)) {
                            (false, _) => Vouched::Unknown,
                            (true, Some(&(base, end))) => Vouched::Upto {
                                base: Some(base),
                                end,
                            },
                            (true, None) => Vouched::Upto { base: None, end: 0 },
                        };
                        let id = opened.len() as u64;
                        let (p, st) = Partition::open(
                            vfs.clone(),
                            tp,
                            id,
                            jdir,
                            pdir,
                            config.clone(),
                            vouched,
                            redo.clean,
                        )?;
                        mine.push(p.clone());
                        opened.push((p, st));
                    }
                    sync_dir(&*vfs, &tdir)?;
                }
                per_log.push(mine);
            }
            let actives: Vec<Active> = opened
                .iter()
                .map(|(p, st)| Active {
                    dir: p.jdir.clone(),
                    base: st.base_offset,
                    size: st.size,
                })
                .collect();
            let journal = JournalFile::create(&*vfs, &d, redo.next_seq, false, &actives)?;
            for old in &redo.files {
                match vfs.remove_file(old) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io("delete", old)(e));
                    }
                    _ => {}
                }
            }
            sync_dir(&*vfs, &d)?;
            Ok((opened, per_log, journal))
        })
        .await
        .map_err(|e| Error::io("open", &dir)(std::io::Error::other(e)))??;
        let (opened, per_log, journal) = opened;
        let configs: Vec<_> = members.iter().map(|(_, _, c)| c.clone()).collect();
        let writer = Arc::new(Writer::start(
            fs.clone(),
            dir.clone(),
            &configs,
            journal,
            opened,
            failed.clone(),
            lock,
        )?);
        let logs = members
            .into_iter()
            .zip(per_log)
            .map(|((root, jprefix, config), parts)| {
                tracing::info!(root = %root.display(), partitions = parts.len(), "log opened");
                EmbeddedLog {
                    inner: Arc::new(Inner {
                        fs: fs.clone(),
                        root,
                        config,
                        partitions: RwLock::new(
                            parts.into_iter().map(|p| (p.tp.clone(), p)).collect(),
                        ),
                        create: tokio::sync::Mutex::new(()),
                        jprefix,
                        writer: writer.clone(),
                        closed: AtomicBool::new(false),
                        failed: failed.clone(),
                    }),
                }
            })
            .collect();
        Ok(logs)
    }

    /// Resolves to the cause once a write or an fsync of any partition
    /// failed. What such a failure left on disk is unknown (the kernel may
    /// have dropped the dirty pages and reported the error once), so the
    /// owner must stop: the failed partition already refuses writes and cut
    /// its file back to what was last synced; a restart recovers from disk.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.inner.failed.subscribe()
    }

    /// The settings the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    fn partition(&self, tp: &TopicPartition) -> Result<Arc<Partition>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.inner
            .partitions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tp)
            .cloned()
            .ok_or_else(|| Error::UnknownPartition(tp.clone()))
    }

    /// `fdatasync` calls on the journal and segment files made so far (for
    /// benchmarks and tests of the durability bounds).
    pub fn syncs(&self) -> u64 {
        self.inner.writer.syncs()
    }

    /// How long the writer's sync rounds for appends took (see
    /// [`SyncTimes`]); shared by the logs of a group, as their syncs are.
    pub fn sync_times(&self) -> crate::SyncTimes {
        self.inner.writer.sync_times()
    }

    /// A reader of [`syncs`](Self::syncs) that holds nothing of the log
    /// open, and goes on reading the last count once it is closed.
    pub fn sync_counter(&self) -> SyncCounter {
        SyncCounter(self.inner.writer.sync_count())
    }

    /// Hands an append to the writer and waits for its answer.
    async fn append_to(
        &self,
        tp: &TopicPartition,
        records: Vec<Record>,
        sync: bool,
    ) -> Result<AppendAck> {
        let p = self.partition(tp)?;
        let bytes = p.check(&records)?;
        // whether the writer syncs before acknowledging, per this log's
        // policy (an interval is kept by the writer's tick)
        let sync = sync && self.inner.config.fsync == FsyncPolicy::Always;
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .queue
            .send(Job::Append(
                p.id,
                AppendRequest {
                    records,
                    bytes,
                    sync,
                    reply,
                },
            ))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Applies the retention limits to every partition now; returns the
    /// number of segments deleted.
    pub async fn enforce_retention(&self) -> Result<usize> {
        let retention = self.inner.config.retention;
        if retention.max_age.is_none() && retention.max_bytes.is_none() {
            return Ok(0);
        }
        let parts: Vec<_> = self
            .inner
            .partitions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        tokio::task::spawn_blocking(move || {
            let now = chrono::Utc::now().timestamp_millis();
            parts
                .iter()
                .map(|p| p.enforce_retention(retention, now))
                .sum::<Result<usize>>()
        })
        .await
        .map_err(|e| Error::io("retention", "log")(std::io::Error::other(e)))?
    }

    /// Lets queued appends finish, checkpoints the journal (every segment
    /// synced, the active segments' indexes written, so that the next open
    /// need not scan them) and stops the writer. Appends after this fail
    /// with [`Error::Closed`].
    ///
    /// In a group, the writer stops with the last log closed; closing
    /// another syncs what it wrote.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let writer = &self.inner.writer;
        if writer.open_logs.fetch_sub(1, Ordering::AcqRel) == 1 {
            writer.close().await;
            return;
        }
        let (tx, rx) = oneshot::channel();
        if writer.queue.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
        for p in read_lock(&self.inner.partitions).values() {
            p.close_readers();
        }
    }
}

impl Log for EmbeddedLog {
    async fn create_partition(&self, tp: &TopicPartition) -> Result<()> {
        validate_topic_name(&tp.topic)?;
        let _guard = self.inner.create.lock().await;
        if self.partition(tp).is_ok() {
            return Err(Error::PartitionExists(tp.clone()));
        }
        let root = self.inner.root.clone();
        let config = self.inner.config.clone();
        let fs = self.inner.fs.clone();
        let tp2 = tp.clone();
        let id = self.inner.writer.next_id.fetch_add(1, Ordering::Relaxed);
        let jdir = format!("{}{}/{}", self.inner.jprefix, tp.topic, tp.partition);
        let (p, st) = tokio::task::spawn_blocking(move || {
            let pdir = root.join(&tp2.topic).join(tp2.partition.to_string());
            create_dirs(&*fs, &pdir)?;
            Partition::open(fs, tp2, id, jdir, pdir, config, Vouched::Unknown, false)
        })
        .await
        .map_err(|e| Error::io("create partition", &self.inner.root)(std::io::Error::other(e)))??;
        self.inner
            .writer
            .queue
            .send(Job::Register(p.clone(), st))
            .await
            .map_err(|_| Error::Closed)?;
        self.inner
            .partitions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tp.clone(), p);
        Ok(())
    }

    async fn delete_partition(&self, tp: &TopicPartition) -> Result<()> {
        let _guard = self.inner.create.lock().await;
        let p = self
            .inner
            .partitions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(tp)
            .ok_or_else(|| Error::UnknownPartition(tp.clone()))?;
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .queue
            .send(Job::Unregister(p.id, reply))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)??;
        // No journal file names it now: its files can go.
        let fs = self.inner.fs.clone();
        let dir = p.dir().to_owned();
        tokio::task::spawn_blocking(move || remove_partition_dir(&*fs, &dir, true))
            .await
            .map_err(|e| Error::io("delete", &self.inner.root)(std::io::Error::other(e)))?
    }

    fn partitions(&self) -> Vec<TopicPartition> {
        let mut v: Vec<_> = self
            .inner
            .partitions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    async fn append(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<AppendAck> {
        self.append_to(tp, records, true).await
    }

    async fn append_relaxed(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<AppendAck> {
        self.append_to(tp, records, false).await
    }

    async fn sync(&self, tp: &TopicPartition) -> Result<()> {
        let p = self.partition(tp)?;
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .queue
            .send(Job::Sync(Some((p.id, reply))))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn read(
        &self,
        tp: &TopicPartition,
        from: u64,
        budget: ReadBudget,
    ) -> Result<Vec<StoredRecord>> {
        let p = self.partition(tp)?;
        tokio::task::spawn_blocking(move || p.read(from, budget))
            .await
            .map_err(|e| Error::io("read", "log")(std::io::Error::other(e)))?
    }

    fn offsets(&self, tp: &TopicPartition) -> Result<Offsets> {
        Ok(self.partition(tp)?.offsets())
    }

    async fn wait_for(&self, tp: &TopicPartition, offset: u64) -> Result<u64> {
        self.partition(tp)?.wait_for(offset).await
    }

    async fn truncate_before(&self, tp: &TopicPartition, offset: u64) -> Result<u64> {
        let p = self.partition(tp)?;
        tokio::task::spawn_blocking(move || p.truncate_before(offset))
            .await
            .map_err(|e| Error::io("truncate", "log")(std::io::Error::other(e)))?
    }
}

/// `fdatasync` calls made by a data folder's writer so far (see
/// [`EmbeddedLog::sync_counter`]).
#[derive(Clone, Debug)]
pub struct SyncCounter(Arc<AtomicU64>);

impl SyncCounter {
    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
