//! Storage on a real RocksDB in a temp dir: seq assignment under concurrent
//! writers, reopen, dedup, groups and retention.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use ferry_protocol::ErrorCode;
use ferry_protocol::proto::{EntryKind, GroupRole};
use ferry_storage::{
    CommitOptions, Committer, GroupChange, Op, Outcome, Storage, StorageOptions, Target,
};

type Results = mpsc::Receiver<(u32, Outcome)>;

/// A running committer, stopped (and waited for) when dropped: a test that
/// returned with it still running would let the process exit while its
/// threads close RocksDB, which aborts the process.
struct Running(Committer<u32>);

impl std::ops::Deref for Running {
    type Target = Committer<u32>;
    fn deref(&self) -> &Committer<u32> {
        &self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.blocking_stop();
    }
}

fn start(storage: &Arc<Storage>) -> (Running, Results) {
    let (tx, rx) = mpsc::channel();
    let committer = Committer::start(
        storage.clone(),
        CommitOptions::default(),
        move |batch, _links| {
            for item in batch {
                let _ = tx.send(item);
            }
        },
    )
    .unwrap();
    (Running(committer), rx)
}

fn send(from: &str, cid: u64, to: &str, body: &str) -> Op {
    Op::Send {
        from: from.into(),
        client_msg_id: cid,
        to: Target::Direct(to.into()),
        content_type: "text/plain".into(),
        body: Bytes::copy_from_slice(body.as_bytes()),
        system: false,
    }
}

fn open(dir: &std::path::Path) -> Arc<Storage> {
    Storage::open(dir, StorageOptions::default()).unwrap()
}

#[test]
fn seqs_are_gap_free_and_increasing_under_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    let (committer, results) = start(&storage);
    let writers = 8;
    let per_writer = 250;
    std::thread::scope(|s| {
        for w in 0..writers {
            let committer = committer.clone();
            s.spawn(move || {
                for i in 0..per_writer {
                    let op = send(&format!("w{w}"), i + 1, &format!("r{}", i % 3), "x");
                    committer.blocking_submit(op, w).unwrap();
                }
            });
        }
    });
    let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
    for _ in 0..writers * per_writer as u32 {
        let (_, outcome) = results.recv_timeout(Duration::from_secs(30)).unwrap();
        let Outcome::Sent {
            fanouts, duplicate, ..
        } = outcome
        else {
            panic!("unexpected {outcome:?}");
        };
        assert!(!duplicate);
        for f in fanouts {
            for (user, seq) in f.targets {
                seqs.entry(user.to_string()).or_default().push(seq);
            }
        }
    }
    for (user, list) in &seqs {
        // Delivered in commit order: strictly increasing and gap-free from 1.
        let expected: Vec<u64> = (1..=list.len() as u64).collect();
        assert_eq!(list, &expected, "seqs of {user}");
        assert_eq!(storage.max_seq(user).unwrap(), list.len() as u64);
    }
    // Each recipient's inbox reads back in order with the right bodies.
    let page = storage.read_inbox("r0", 0, 10_000).unwrap();
    assert!(!page.has_more);
    assert_eq!(page.entries.len(), seqs["r0"].len());
    for (i, e) in page.entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(e.body, Bytes::from_static(b"x"));
        assert_eq!(e.kind, EntryKind::Message as i32);
    }
}

#[test]
fn reopen_keeps_seqs_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let first_ack;
    {
        let storage = open(dir.path());
        let (committer, results) = start(&storage);
        committer
            .blocking_submit(send("a", 1, "b", "one"), 0)
            .unwrap();
        committer
            .blocking_submit(send("a", 2, "b", "two"), 0)
            .unwrap();
        let Outcome::Sent { ack, .. } = results.recv().unwrap().1 else {
            panic!()
        };
        first_ack = ack;
        results.recv().unwrap();
    }
    // The first instance's committer was stopped and its storage dropped
    // at the end of the block, so RocksDB's directory lock is released.
    let storage = open(dir.path());
    assert_eq!(storage.max_seq("b").unwrap(), 2);
    assert_eq!(storage.max_seq("a").unwrap(), 2);
    let (committer, results) = start(&storage);
    // A retransmit of client msg 1 gets the original ack and stores nothing.
    committer
        .blocking_submit(send("a", 1, "b", "one"), 0)
        .unwrap();
    let Outcome::Sent {
        ack,
        duplicate,
        recipients,
        fanouts,
    } = results.recv().unwrap().1
    else {
        panic!()
    };
    assert!(duplicate);
    assert_eq!(recipients, 0);
    assert!(fanouts.is_empty());
    assert_eq!(ack, first_ack);
    // A new message continues the seqs.
    committer
        .blocking_submit(send("a", 3, "b", "three"), 0)
        .unwrap();
    let Outcome::Sent { fanouts, .. } = results.recv().unwrap().1 else {
        panic!()
    };
    let b_seq = fanouts
        .iter()
        .flat_map(|f| f.targets.iter())
        .find(|(u, _)| u.as_ref() == "b")
        .unwrap()
        .1;
    assert_eq!(b_seq, 3);
}

#[test]
fn a_data_dir_of_another_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    // Rewrite the schema version behind ferry's back.
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(false);
        let cfs = rocksdb::DB::list_cf(&opts, dir.path()).unwrap();
        let db = rocksdb::DB::open_cf(&opts, dir.path(), &cfs).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        db.put_cf(meta, b"schema_version", 99u32.to_be_bytes())
            .unwrap();
    }
    match Storage::open(dir.path(), StorageOptions::default()) {
        Err(ferry_storage::StorageError::Schema(message)) => {
            assert!(message.contains("99"), "{message}");
        }
        Err(other) => panic!("expected a schema error, got {other}"),
        Ok(_) => panic!("opened a data dir of schema 99"),
    }
}

#[test]
fn group_fanout_and_membership_rules() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    let (committer, results) = start(&storage);
    let create = Op::Group {
        actor: "owner".into(),
        change: GroupChange::Create {
            group_id: "g".into(),
            name: "G".into(),
            members: vec!["m1".into(), "m2".into()],
        },
    };
    committer.blocking_submit(create, 0).unwrap();
    let Outcome::GroupChanged {
        group: Some(group), ..
    } = results.recv().unwrap().1
    else {
        panic!()
    };
    assert_eq!(group.members.len(), 3);
    assert_eq!(group.role("owner"), Some(GroupRole::Owner));

    // A member adds someone: refused.
    let add = Op::Group {
        actor: "m1".into(),
        change: GroupChange::Add {
            group_id: "g".into(),
            members: vec!["x".into()],
        },
    };
    committer.blocking_submit(add, 1).unwrap();
    let Outcome::Refused(r) = results.recv().unwrap().1 else {
        panic!()
    };
    assert_eq!(r.code, ErrorCode::PermissionDenied);

    // A non-member sends: refused; a member sends: everyone gets it.
    let outsider = Op::Send {
        from: "x".into(),
        client_msg_id: 1,
        to: Target::Group("g".into()),
        content_type: "t".into(),
        body: Bytes::from_static(b"hi"),
        system: false,
    };
    committer.blocking_submit(outsider, 2).unwrap();
    let Outcome::Refused(r) = results.recv().unwrap().1 else {
        panic!()
    };
    assert_eq!(r.code, ErrorCode::NotAMember);

    let member = Op::Send {
        from: "m1".into(),
        client_msg_id: 1,
        to: Target::Group("g".into()),
        content_type: "t".into(),
        body: Bytes::from_static(b"hi"),
        system: false,
    };
    committer.blocking_submit(member, 3).unwrap();
    let Outcome::Sent { fanouts, .. } = results.recv().unwrap().1 else {
        panic!()
    };
    let users: Vec<String> = fanouts
        .iter()
        .flat_map(|f| f.targets.iter().map(|(u, _)| u.to_string()))
        .collect();
    assert_eq!(users.len(), 3);
    for u in ["owner", "m1", "m2"] {
        // Group-created event (seq 1), then the message (seq 2).
        let page = storage.read_inbox(u, 0, 10).unwrap();
        assert_eq!(page.entries.len(), 2, "{u}");
        assert_eq!(page.entries[0].kind, EntryKind::GroupEvent as i32);
        assert_eq!(page.entries[1].body, Bytes::from_static(b"hi"));
    }
    // History has the event and the message, newest first.
    let (history, more) = storage
        .history(
            "m2",
            &ferry_storage::keys::ConvKey::Group("g".into()),
            0,
            10,
        )
        .unwrap();
    assert!(!more);
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].body, Bytes::from_static(b"hi"));
}

#[test]
fn inbox_sweep_removes_expired_entries_but_keeps_each_users_newest() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    let (committer, results) = start(&storage);
    for i in 1..=5 {
        committer
            .blocking_submit(send("a", i, "b", "old"), 0)
            .unwrap();
        results.recv().unwrap();
    }
    // A cutoff strictly after the old messages and before the new ones.
    std::thread::sleep(Duration::from_millis(5));
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    std::thread::sleep(Duration::from_millis(5));
    committer
        .blocking_submit(send("a", 6, "b", "new"), 0)
        .unwrap();
    results.recv().unwrap();
    committer
        .blocking_submit(send("c", 1, "d", "old-but-last"), 0)
        .unwrap();
    results.recv().unwrap();

    let report = storage
        .sweep_inbox(cutoff.saturating_sub(0), 2, Duration::ZERO)
        .unwrap();
    // a and b: 5 old entries each removed, the new one kept. c and d: one
    // entry each, written after the cutoff: kept. Chunks of 2 keys: each
    // key counted once across the chunks' iterators.
    assert_eq!(report.scanned, 14);
    assert_eq!(report.removed, 10);
    let b = storage.read_inbox("b", 0, 100).unwrap();
    assert_eq!(b.entries.len(), 1);
    assert_eq!(b.entries[0].seq, 6);
    assert_eq!(b.entries[0].body, Bytes::from_static(b"new"));

    // Everything expired: each user's newest entry still anchors the seq.
    let report = storage.sweep_inbox(u64::MAX, 100, Duration::ZERO).unwrap();
    assert_eq!(report.removed, 0);
    assert_eq!(storage.max_seq("b").unwrap(), 6);
    committer
        .blocking_submit(send("a", 7, "b", "after"), 0)
        .unwrap();
    results.recv().unwrap();
    assert_eq!(storage.max_seq("b").unwrap(), 7);
}

#[test]
fn compaction_drops_expired_messages_only_past_retention() {
    for (days, expect_kept) in [(30, true), (0, false)] {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(
            dir.path(),
            StorageOptions {
                retention_days: days,
                ..Default::default()
            },
        )
        .unwrap();
        let (committer, results) = start(&storage);
        committer
            .blocking_submit(send("a", 1, "b", "m"), 0)
            .unwrap();
        let Outcome::Sent { ack, .. } = results.recv().unwrap().1 else {
            panic!()
        };
        std::thread::sleep(Duration::from_millis(2));
        storage.flush().unwrap();
        storage.compact_all();
        let conv = ferry_storage::keys::ConvKey::direct("a", "b");
        assert_eq!(
            storage.message(&conv, ack.msg_id).unwrap().is_some(),
            expect_kept,
            "retention {days} days"
        );
        assert_eq!(storage.dedup("a", 1).unwrap().is_some(), expect_kept);
    }
}
