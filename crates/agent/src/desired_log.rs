//! The agent's persisted desired state: a snapshot and a journal.
//!
//! `desired.json` holds the whole desired state as of its last rewrite
//! (generation and every VM); `desired.log` holds the changes since, one
//! JSON record a line (`{"put": [VM, ...], "del": [id, ...]}`). A change is
//! one append and one `fdatasync` of the journal, whatever the number of
//! VMs it touches, where a file per VM cost a create, a write, an fsync, a
//! rename and a directory fsync for each VM changed. Once the journal
//! outgrows the snapshot it is folded in: the snapshot is rewritten
//! atomically (temporary file, fsync, rename) and the journal emptied.
//!
//! Crash safety: a change is acted on only after its record is durable. A
//! crash can leave the journal's last record cut short; that record was
//! never acknowledged, so reading skips it (and says so). A record that
//! does not parse anywhere else means the file is damaged, and loading
//! fails rather than guess. Replaying a journal over a snapshot that already
//! holds its changes (a crash between the snapshot's rename and the
//! journal's truncation) gives the same state, since each VM ends as its
//! last record says.
//!
//! Earlier layouts are taken over when loading: `desired/<vm id>.json`, a
//! file per VM (agents of protocol 3 before the journal), and a
//! `desired.json` written by agents before protocol 3 (the snapshot's own
//! format).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virt8ra_api::protocol::DesiredVm;

/// Journals below this size are never folded in.
const MIN_FOLD_BYTES: u64 = 64 << 10;

/// The snapshot's format (also that of agents before protocol 3).
#[derive(Deserialize)]
struct Snapshot {
    generation: u64,
    vms: Vec<DesiredVm>,
}

#[derive(Serialize)]
struct RecordOut<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    put: &'a [&'a DesiredVm],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    del: &'a [String],
}

#[derive(Deserialize)]
struct RecordIn {
    #[serde(default)]
    put: Vec<DesiredVm>,
    #[serde(default)]
    del: Vec<String>,
}

/// What was loaded, and what loading had to skip.
#[derive(Debug)]
pub struct Loaded {
    pub vms: Vec<DesiredVm>,
    /// Bytes of a journal record cut short by a crash (0: none).
    pub torn_bytes: usize,
}

/// What [`DesiredLog::read_all`] found.
struct Read {
    /// The snapshot's generation.
    generation: u64,
    loaded: Loaded,
    /// The per-VM files of the previous layout that were read.
    per_vm_files: Vec<PathBuf>,
    snapshot_bytes: u64,
    journal_bytes: u64,
}

pub struct DesiredLog {
    snapshot: PathBuf,
    journal: PathBuf,
    /// The per-VM files of the previous layout.
    per_vm_dir: PathBuf,
    sizes: Mutex<Sizes>,
}

#[derive(Default)]
struct Sizes {
    journal: u64,
    snapshot: u64,
    /// The journal file exists and its directory entry is durable.
    journal_known: bool,
}

impl DesiredLog {
    /// The desired state kept in `data_dir` (nothing is read until [`load`]).
    ///
    /// [`load`]: DesiredLog::load
    pub fn new(data_dir: &Path) -> DesiredLog {
        DesiredLog {
            snapshot: data_dir.join("desired.json"),
            journal: data_dir.join("desired.log"),
            per_vm_dir: data_dir.join("desired"),
            sizes: Mutex::new(Sizes::default()),
        }
    }

    fn sizes(&self) -> std::sync::MutexGuard<'_, Sizes> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the desired state (snapshot, then any per-VM files of the
    /// previous layout, then the journal) and, when there was anything
    /// besides the snapshot, rewrites it as one snapshot with an empty
    /// journal. A snapshot alone is left as it is (at 1,000 VMs a rewrite
    /// is a few hundred kilobytes written and synced at every start).
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let r = self.read_all()?;
        if r.per_vm_files.is_empty() && r.journal_bytes == 0 {
            let mut sizes = self.sizes();
            sizes.snapshot = r.snapshot_bytes;
            sizes.journal = 0;
            // The next record syncs the directory, as after a rewrite
            // that found no journal.
            sizes.journal_known = false;
            return Ok(r.loaded);
        }
        // One snapshot from now on; the older layout goes once it is in it.
        let refs: Vec<&DesiredVm> = r.loaded.vms.iter().collect();
        self.rewrite(r.generation, &refs)?;
        for path in r.per_vm_files {
            std::fs::remove_file(&path)?;
        }
        // Anything else an operator put there stays, and so does the directory.
        let _ = std::fs::remove_dir(&self.per_vm_dir);
        Ok(r.loaded)
    }

    /// The desired state as persisted, changing nothing.
    #[cfg(test)]
    pub(crate) fn read(&self) -> anyhow::Result<Loaded> {
        Ok(self.read_all()?.loaded)
    }

    fn read_all(&self) -> anyhow::Result<Read> {
        let mut generation = 0;
        let mut snapshot_bytes = 0;
        let mut journal_bytes = 0;
        let mut vms: HashMap<String, DesiredVm> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut put = |d: DesiredVm, vms: &mut HashMap<String, DesiredVm>| {
            if !vms.contains_key(&d.id) {
                order.push(d.id.clone());
            }
            vms.insert(d.id.clone(), d);
        };
        match std::fs::read(&self.snapshot) {
            Ok(b) => {
                snapshot_bytes = b.len() as u64;
                let s: Snapshot = serde_json::from_slice(&b)
                    .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", self.snapshot.display()))?;
                generation = s.generation;
                for d in s.vms {
                    put(d, &mut vms);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let mut per_vm_files = Vec::new();
        match std::fs::read_dir(&self.per_vm_dir) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry?.path();
                    match path.extension().and_then(|e| e.to_str()) {
                        Some("json") => {
                            let b = std::fs::read(&path)?;
                            let d: DesiredVm = serde_json::from_slice(&b).map_err(|e| {
                                anyhow::anyhow!("{} is corrupt: {e}", path.display())
                            })?;
                            put(d, &mut vms);
                        }
                        // A write of that layout cut short by a crash.
                        Some("tmp") => {}
                        _ => continue,
                    }
                    per_vm_files.push(path);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let mut torn_bytes = 0;
        match std::fs::read(&self.journal) {
            Ok(b) => {
                journal_bytes = b.len() as u64;
                let lines: Vec<&[u8]> = b.split(|c| *c == b'\n').collect();
                let last = lines.iter().rposition(|l| !l.is_empty());
                for (i, line) in lines.iter().enumerate() {
                    if line.is_empty() {
                        continue;
                    }
                    let r: RecordIn = match serde_json::from_slice(line) {
                        Ok(r) => r,
                        // The last record, cut short by a crash while it
                        // was written: never acknowledged, never acted on.
                        Err(_) if Some(i) == last => {
                            torn_bytes = line.len();
                            break;
                        }
                        Err(e) => anyhow::bail!(
                            "{} is corrupt at line {}: {e}",
                            self.journal.display(),
                            i + 1
                        ),
                    };
                    for id in r.del {
                        vms.remove(&id);
                    }
                    for d in r.put {
                        put(d, &mut vms);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let out: Vec<DesiredVm> = order.iter().filter_map(|id| vms.remove(id)).collect();
        Ok(Read {
            generation,
            loaded: Loaded {
                vms: out,
                torn_bytes,
            },
            per_vm_files,
            snapshot_bytes,
            journal_bytes,
        })
    }

    /// Appends one change (VMs put, VMs removed) to the journal and returns
    /// once it is durable.
    pub fn append(&self, put: &[&DesiredVm], del: &[String]) -> std::io::Result<()> {
        if put.is_empty() && del.is_empty() {
            return Ok(());
        }
        let mut line =
            serde_json::to_vec(&RecordOut { put, del }).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut sizes = self.sizes();
        // Opened for each record: a process of simulated hosts runs
        // 100,000 agents, more than it may hold files open.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)?;
        let before = f.metadata()?.len();
        let written = f.write_all(&line).and_then(|()| f.sync_data());
        if let Err(e) = written {
            // Leave no partial record for a later one to follow.
            let _ = f.set_len(before).and_then(|()| f.sync_data());
            return Err(e);
        }
        if !sizes.journal_known {
            crate::durable::sync_dir(&self.journal)?;
            sizes.journal_known = true;
        }
        sizes.journal = before + line.len() as u64;
        Ok(())
    }

    /// Whether the journal has outgrown the snapshot (see [`rewrite`]).
    ///
    /// [`rewrite`]: DesiredLog::rewrite
    pub fn wants_fold(&self) -> bool {
        let s = self.sizes();
        s.journal > MIN_FOLD_BYTES && s.journal > s.snapshot
    }

    /// Writes `vms` as the whole desired state and empties the journal.
    pub fn rewrite(&self, generation: u64, vms: &[&DesiredVm]) -> std::io::Result<()> {
        #[derive(Serialize)]
        struct SnapshotOut<'a> {
            generation: u64,
            vms: &'a [&'a DesiredVm],
        }
        let b =
            serde_json::to_vec(&SnapshotOut { generation, vms }).map_err(std::io::Error::other)?;
        let mut sizes = self.sizes();
        crate::durable::write_atomic(&self.snapshot, &b)?;
        sizes.snapshot = b.len() as u64;
        match std::fs::OpenOptions::new().write(true).open(&self.journal) {
            Ok(f) => {
                f.set_len(0)?;
                f.sync_data()?;
                sizes.journal_known = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                sizes.journal_known = false;
            }
            Err(e) => return Err(e),
        }
        sizes.journal = 0;
        Ok(())
    }

    /// Folds the journal into a snapshot of `vms` (the whole state), as
    /// [`rewrite`] does; for callers that hold the state shared.
    ///
    /// [`rewrite`]: DesiredLog::rewrite
    pub fn fold(&self, generation: u64, vms: &[Arc<DesiredVm>]) -> std::io::Result<()> {
        let refs: Vec<&DesiredVm> = vms.iter().map(|d| &**d).collect();
        self.rewrite(generation, &refs)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virt8ra_api::PowerState;

    /// A minimal desired VM (also for the reconciler's tests).
    pub(crate) fn dvm(id: &str, power: PowerState) -> DesiredVm {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "vcpus": 1, "memory_mib": 64, "disk_gib": 1,
            "image": {"id": "i", "name": "i", "sha256": "s", "size_bytes": 1, "url_path": "/i"},
            "power": power, "reboot_generation": 0, "stop_timeout_s": 1,
        }))
        .expect("desired vm")
    }

    fn ids(l: &Loaded) -> Vec<(String, PowerState)> {
        let mut v: Vec<_> = l.vms.iter().map(|d| (d.id.clone(), d.power)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn changes_survive_a_reload_and_leave_one_snapshot() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = DesiredLog::new(tmp.path());
        let (a, b) = (dvm("a", PowerState::Running), dvm("b", PowerState::Running));
        log.rewrite(1, &[&a, &b]).expect("snapshot");
        let b2 = dvm("b", PowerState::Stopped);
        let c = dvm("c", PowerState::Running);
        log.append(&[&b2, &c], &["a".to_string()]).expect("append");
        log.append(&[], &["c".to_string()]).expect("append");
        let journal = std::fs::read_to_string(tmp.path().join("desired.log")).expect("journal");
        assert_eq!(journal.lines().count(), 2, "one line per change: {journal}");

        let loaded = DesiredLog::new(tmp.path()).load().expect("load");
        assert_eq!(loaded.torn_bytes, 0);
        assert_eq!(ids(&loaded), [("b".to_string(), PowerState::Stopped)]);
        // Loading folded the journal into the snapshot.
        assert_eq!(
            std::fs::metadata(tmp.path().join("desired.log"))
                .expect("journal")
                .len(),
            0
        );
        let again = DesiredLog::new(tmp.path()).load().expect("load");
        assert_eq!(ids(&again), [("b".to_string(), PowerState::Stopped)]);
    }

    #[test]
    fn a_start_with_nothing_to_fold_leaves_the_snapshot_alone() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let snapshot = tmp.path().join("desired.json");
        // The snapshot is replaced by a rename, so a rewrite is a new inode.
        let inode = || std::fs::metadata(&snapshot).expect("snapshot").ino();
        let log = DesiredLog::new(tmp.path());
        log.rewrite(3, &[&dvm("a", PowerState::Running)])
            .expect("snapshot");
        let first = inode();
        let log = DesiredLog::new(tmp.path());
        let loaded = log.load().expect("load");
        assert_eq!(ids(&loaded), [("a".to_string(), PowerState::Running)]);
        assert_eq!(inode(), first, "a snapshot alone was rewritten");
        // Records appended after such a start are kept, and the next start
        // folds them.
        log.append(&[&dvm("b", PowerState::Stopped)], &[])
            .expect("append");
        let loaded = DesiredLog::new(tmp.path()).load().expect("load");
        assert_eq!(
            ids(&loaded),
            [
                ("a".to_string(), PowerState::Running),
                ("b".to_string(), PowerState::Stopped)
            ]
        );
        assert_ne!(inode(), first, "the journal was not folded in");
    }

    #[test]
    fn a_record_cut_short_is_skipped_and_damage_elsewhere_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = DesiredLog::new(tmp.path());
        log.append(&[&dvm("a", PowerState::Running)], &[])
            .expect("append");
        let path = tmp.path().join("desired.log");
        let good = std::fs::read(&path).expect("journal");
        // A crash while the second record was written: half of it is there.
        let second = serde_json::to_vec(&RecordOut {
            put: &[&dvm("b", PowerState::Running)],
            del: &[],
        })
        .expect("json");
        let mut torn = good.clone();
        torn.extend_from_slice(&second[..second.len() / 2]);
        std::fs::write(&path, &torn).expect("write");
        let loaded = DesiredLog::new(tmp.path()).load().expect("load");
        assert_eq!(ids(&loaded), [("a".to_string(), PowerState::Running)]);
        assert_eq!(loaded.torn_bytes, second.len() / 2);

        // The same half record followed by a whole one is damage, not a
        // crash: nothing is guessed.
        let mut damaged = torn.clone();
        damaged.push(b'\n');
        damaged.extend_from_slice(&good);
        std::fs::write(&path, &damaged).expect("write");
        let err = DesiredLog::new(tmp.path()).load().expect_err("corrupt");
        assert!(err.to_string().contains("corrupt at line 2"), "{err}");
    }

    #[test]
    fn the_journal_is_folded_in_once_it_outgrows_the_snapshot() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = DesiredLog::new(tmp.path());
        let vms: Vec<Arc<DesiredVm>> = (0..4)
            .map(|i| Arc::new(dvm(&format!("vm{i}"), PowerState::Running)))
            .collect();
        let refs: Vec<&DesiredVm> = vms.iter().map(|d| &**d).collect();
        log.rewrite(1, &refs).expect("snapshot");
        let mut appended = 0;
        while !log.wants_fold() {
            log.append(&[&vms[appended % 4]], &[]).expect("append");
            appended += 1;
            assert!(appended < 10_000, "the journal never asked to be folded");
        }
        assert!(appended > 4, "folded after {appended} records");
        log.fold(2, &vms).expect("fold");
        assert!(!log.wants_fold());
        let journal = tmp.path().join("desired.log");
        assert_eq!(std::fs::metadata(&journal).expect("journal").len(), 0);
        let loaded = DesiredLog::new(tmp.path()).load().expect("load");
        assert_eq!(loaded.vms.len(), 4);
    }

    #[test]
    fn per_vm_files_of_the_previous_layout_are_taken_over() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("desired");
        std::fs::create_dir_all(&dir).expect("dir");
        for id in ["x", "y"] {
            std::fs::write(
                dir.join(format!("{id}.json")),
                serde_json::to_vec(&dvm(id, PowerState::Running)).expect("json"),
            )
            .expect("write");
        }
        let loaded = DesiredLog::new(tmp.path()).load().expect("load");
        assert_eq!(loaded.vms.len(), 2);
        assert!(!dir.exists(), "the per-VM files are gone once taken over");
        let again = DesiredLog::new(tmp.path()).load().expect("load");
        assert_eq!(again.vms.len(), 2);
    }
}
