//! The embedded backend: one folder per topic-partition under a root folder
//! (`<root>/<topic>/<partition>/`), each holding segment files, and one
//! journal beside them (`<root>/journal-<n>.wal`) written by the log's one
//! writer; opened and recovered at start-up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use tokio::sync::{oneshot, watch};

use crate::batch::MAX_ON_DISK;
use crate::config::LogConfig;
use crate::error::{Error, Result};
use crate::journal::{self, Active, JournalFile};
use crate::log::{AppendAck, Log, Offsets};
use crate::partition::{AppendRequest, Partition, Vouched, sync_dir};
use crate::record::{Record, StoredRecord, TopicPartition, validate_topic_name};
use crate::segment::ReadBudget;
use crate::vfs::{OsFs, Vfs};
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
    /// Number for the next partition created.
    next_id: AtomicU64,
    writer: Writer,
    /// Set to the cause by the first write or sync that failed.
    failed: Arc<watch::Sender<Option<String>>>,
}

impl Drop for Inner {
    /// The last handle gone without `close`: let the writer finish what is
    /// queued and stop.
    fn drop(&mut self) {
        self.writer.stop();
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
        check_config(&config)?;
        let root = root.into();
        let config = Arc::new(config);
        let (r, c) = (root.clone(), config.clone());
        let failed = Arc::new(watch::channel(None).0);
        let vfs = fs.clone();
        let opened = tokio::task::spawn_blocking(move || -> Result<_> {
            create_dirs(&*vfs, &r)?;
            // A process that crashed (the machine still up) may have left
            // folder entries nobody synced: sync the chain of folders
            // before serving anything (each partition syncs its own).
            if let Some(parent) = parent_of(&r) {
                sync_dir(&*vfs, parent)?;
            }
            sync_dir(&*vfs, &r)?;
            let redo = journal::recover(&*vfs, &r)?;
            if redo.redone > 0 {
                tracing::info!(root = %r.display(), batches = redo.redone,
                    "journal redone into the segment files");
            }
            let mut opened = Vec::new();
            for (topic, tdir) in subdirs(&*vfs, &r)? {
                if validate_topic_name(&topic).is_err() {
                    tracing::warn!(folder = %tdir.display(), "ignoring folder that is not a topic");
                    continue;
                }
                for (part, pdir) in subdirs(&*vfs, &tdir)? {
                    let Ok(partition) = part.parse::<u32>() else {
                        tracing::warn!(folder = %pdir.display(), "ignoring folder that is not a partition");
                        continue;
                    };
                    let tp = TopicPartition::new(topic.clone(), partition);
                    let vouched = match (redo.found, redo.vouched.get(&tp)) {
                        (false, _) => Vouched::Unknown,
                        (true, Some(&(base, end))) => Vouched::Upto {
                            base: Some(base),
                            end,
                        },
                        (true, None) => Vouched::Upto { base: None, end: 0 },
                    };
                    let id = opened.len() as u64;
                    opened.push(Partition::open(
                        vfs.clone(),
                        tp,
                        id,
                        pdir,
                        c.clone(),
                        vouched,
                        redo.clean,
                    )?);
                }
                sync_dir(&*vfs, &tdir)?;
            }
            let actives: Vec<Active> = opened
                .iter()
                .map(|(p, st)| Active {
                    tp: p.tp.clone(),
                    base: st.base_offset,
                    size: st.size,
                })
                .collect();
            let journal = JournalFile::create(&*vfs, &r, redo.next_seq, false, &actives)?;
            for old in &redo.files {
                vfs.remove_file(old).map_err(Error::io("delete", old))?;
            }
            sync_dir(&*vfs, &r)?;
            Ok((opened, journal))
        })
        .await
        .map_err(|e| Error::io("open", &root)(std::io::Error::other(e)))??;
        let (opened, journal) = opened;
        let partitions: HashMap<_, _> = opened
            .iter()
            .map(|(p, _)| (p.tp.clone(), p.clone()))
            .collect();
        let next_id = AtomicU64::new(opened.len() as u64);
        let writer = Writer::start(
            fs.clone(),
            root.clone(),
            config.clone(),
            journal,
            opened,
            failed.clone(),
        )?;
        tracing::info!(root = %root.display(), partitions = partitions.len(), "log opened");
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                fs,
                root,
                config,
                partitions: RwLock::new(partitions),
                create: tokio::sync::Mutex::new(()),
                next_id,
                writer,
                failed,
            }),
        })
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

    /// Hands an append to the writer and waits for its answer.
    async fn append_to(
        &self,
        tp: &TopicPartition,
        records: Vec<Record>,
        sync: bool,
    ) -> Result<AppendAck> {
        let p = self.partition(tp)?;
        let bytes = p.check(&records)?;
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
    pub async fn close(&self) {
        self.inner.writer.close().await;
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
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (p, st) = tokio::task::spawn_blocking(move || {
            let pdir = root.join(&tp2.topic).join(tp2.partition.to_string());
            create_dirs(&*fs, &pdir)?;
            Partition::open(fs, tp2, id, pdir, config, Vouched::Unknown, false)
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
