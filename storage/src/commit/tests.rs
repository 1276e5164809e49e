//! The committer's rules, op by op, on a real RocksDB in a temp dir, one
//! batch at a time from the test thread.

use super::*;
use crate::StorageOptions;

/// A worker on a fresh database, driven batch by batch from the test
/// thread (no committer threads: batches are exactly what a test says).
pub(super) fn worker(options: CommitOptions) -> (tempfile::TempDir, Arc<Storage>, Worker) {
    worker_with(options, StorageOptions::default())
}

fn worker_with(
    options: CommitOptions,
    storage_options: StorageOptions,
) -> (tempfile::TempDir, Arc<Storage>, Worker) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), storage_options).unwrap();
    let worker = Worker::new(storage.clone(), options, 0);
    (dir, storage, worker)
}

/// Applies `ops` as one batch and commits it.
pub(super) fn batch(worker: &mut Worker, ops: Vec<Op>) -> Vec<Outcome> {
    let mut state = BatchState::default();
    let mut results: Vec<((), Outcome)> = ops
        .into_iter()
        .map(|op| ((), worker.apply(op, &mut state)))
        .collect();
    worker.commit(state, &mut results);
    results.into_iter().map(|(_, o)| o).collect()
}

fn send(from: &str, cid: u64, to: &str) -> Op {
    Op::Send {
        from: from.into(),
        client_msg_id: cid,
        to: Target::Direct(to.into()),
        content_type: "text/plain".into(),
        body: Bytes::from_static(b"hi"),
        system: false,
    }
}

fn group_op(actor: &str, change: GroupChange) -> Op {
    Op::Group {
        actor: actor.into(),
        change,
    }
}

fn create(actor: &str, id: &str, name: &str, members: &[&str]) -> Op {
    group_op(
        actor,
        GroupChange::Create {
            group_id: id.into(),
            name: name.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        },
    )
}

fn seq_of(outcome: &Outcome, user: &str) -> Option<u64> {
    let fanouts = match outcome {
        Outcome::Sent { fanouts, .. }
        | Outcome::Recalled { fanouts, .. }
        | Outcome::GroupChanged { fanouts, .. }
        | Outcome::Applied { fanouts } => fanouts,
        _ => return None,
    };
    fanouts
        .iter()
        .flat_map(|f| f.targets.iter())
        .find(|(u, _)| u.as_ref() == user)
        .map(|(_, seq)| *seq)
}

fn refused(outcome: &Outcome) -> ErrorCode {
    match outcome {
        Outcome::Refused(r) => r.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn fail_reads(storage: &Storage, what: &'static str, id: &str) {
    *storage.faults.fail_reads_of.lock().unwrap() = Some((what, id.to_owned()));
}

fn heal(storage: &Storage) {
    *storage.faults.fail_reads_of.lock().unwrap() = None;
}

#[test]
fn an_op_that_fails_midway_leaves_nothing_and_its_batch_commits_the_rest() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    // alice -> bob puts bob's entry, then fails reading alice's seq.
    fail_reads(&storage, "max_seq", "alice");
    let mut state = BatchState::default();
    let first = w.apply(send("carol", 1, "dave"), &mut state);
    let failed = w.apply(send("alice", 7, "bob"), &mut state);
    assert!(matches!(failed, Outcome::Failed(_)), "{failed:?}");
    let next = w.apply(send("erin", 1, "bob"), &mut state);
    let mut results = vec![((), first), ((), failed), ((), next)];
    w.commit(state, &mut results);
    assert_eq!(seq_of(&results[0].1, "dave"), Some(1));
    assert_eq!(
        seq_of(&results[2].1, "bob"),
        Some(1),
        "the failed op used up no seq of bob"
    );
    heal(&storage);

    // Nothing of the failed op reached the database.
    let bob = storage.read_inbox("bob", 0, 10).unwrap();
    assert_eq!(bob.entries.len(), 1);
    assert_eq!(bob.entries[0].from, "erin");
    assert_eq!(storage.max_seq("alice").unwrap(), 0);
    assert_eq!(storage.dedup("alice", 7).unwrap(), None);
    let (history, _) = storage
        .history("bob", &ConvKey::direct("alice", "bob"), 0, 10)
        .unwrap();
    assert!(history.is_empty(), "the failed op's message was stored");
    assert_eq!(storage.read_inbox("dave", 0, 10).unwrap().entries.len(), 1);

    // The retry is a first send, gap-free for everyone.
    let retry = batch(&mut w, vec![send("alice", 7, "bob")]);
    let Outcome::Sent { duplicate, .. } = &retry[0] else {
        panic!("{:?}", retry[0])
    };
    assert!(!duplicate);
    assert_eq!(seq_of(&retry[0], "bob"), Some(2));
    assert_eq!(seq_of(&retry[0], "alice"), Some(1));
}

#[test]
fn a_group_change_that_fails_midway_leaves_no_group() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    fail_reads(&storage, "max_seq", "m2");
    let mut state = BatchState::default();
    let failed = w.apply(create("owner", "g", "G", &["m1", "m2"]), &mut state);
    assert!(matches!(failed, Outcome::Failed(_)), "{failed:?}");
    // Later ops of the batch do not see the group either.
    let send_to_g = Op::Send {
        from: "owner".into(),
        client_msg_id: 1,
        to: Target::Group("g".into()),
        content_type: String::new(),
        body: Bytes::from_static(b"x"),
        system: false,
    };
    let no_group = w.apply(send_to_g, &mut state);
    assert_eq!(refused(&no_group), ErrorCode::NoSuchGroup);
    heal(&storage);
    let created = w.apply(create("owner", "g", "G", &["m1", "m2"]), &mut state);
    assert_eq!(seq_of(&created, "m1"), Some(1));
    let mut results = vec![((), failed), ((), no_group), ((), created)];
    w.commit(state, &mut results);
    for user in ["owner", "m1", "m2"] {
        let page = storage.read_inbox(user, 0, 10).unwrap();
        assert_eq!(page.entries.len(), 1, "{user}: one CREATED event");
        assert_eq!(page.entries[0].seq, 1);
    }
    assert_eq!(storage.group("g").unwrap().unwrap().members.len(), 3);
}

#[test]
fn a_failed_write_fails_the_batch_and_is_reported_until_one_succeeds() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    storage.faults.fail_writes.store(true, Ordering::Relaxed);
    let out = batch(&mut w, vec![send("a", 1, "b")]);
    assert!(matches!(out[0], Outcome::Failed(_)));
    assert!(storage.writes_failing());
    storage.faults.fail_writes.store(false, Ordering::Relaxed);
    let out = batch(&mut w, vec![send("a", 1, "b")]);
    assert_eq!(seq_of(&out[0], "b"), Some(1), "no seq skipped");
    assert!(!storage.writes_failing());
}

#[test]
fn entries_that_would_not_fit_a_frame_are_refused_and_nothing_is_stored() {
    let options = CommitOptions {
        max_entry_bytes: 600,
        ..Default::default()
    };
    let (_dir, storage, mut w) = worker(options);
    // A name that fits.
    let out = batch(
        &mut w,
        vec![create("owner", "g", &"n".repeat(200), &["m1"])],
    );
    assert!(
        matches!(out[0], Outcome::GroupChanged { .. }),
        "{:?}",
        out[0]
    );
    // A MEMBERS_ADDED event naming 20 users of 60 bytes does not.
    let users: Vec<String> = (0..20).map(|i| format!("{i:0>60}")).collect();
    let add = group_op(
        "owner",
        GroupChange::Add {
            group_id: "g".into(),
            members: users.clone(),
        },
    );
    let out = batch(&mut w, vec![add]);
    let Outcome::Refused(r) = &out[0] else {
        panic!("{:?}", out[0])
    };
    assert_eq!(r.code, ErrorCode::InvalidRequest);
    assert!(
        r.message.contains("would not fit in a frame"),
        "{}",
        r.message
    );
    let g = storage.group("g").unwrap().unwrap();
    assert_eq!(g.members.len(), 2, "no member was added");
    assert_eq!(storage.max_seq("owner").unwrap(), 1, "no event was stored");
    assert_eq!(storage.max_seq(&users[0]).unwrap(), 0);
    // Fewer users fit.
    let add = group_op(
        "owner",
        GroupChange::Add {
            group_id: "g".into(),
            members: users[..3].to_vec(),
        },
    );
    let out = batch(&mut w, vec![add]);
    assert_eq!(seq_of(&out[0], &users[0]), Some(1));
    // A message too large for the frame.
    let big = Op::Send {
        from: "a".into(),
        client_msg_id: 1,
        to: Target::Direct("b".into()),
        content_type: String::new(),
        body: Bytes::from(vec![b'x'; 600]),
        system: false,
    };
    let out = batch(&mut w, vec![big]);
    assert_eq!(refused(&out[0]), ErrorCode::InvalidRequest);
    assert_eq!(storage.max_seq("b").unwrap(), 0);
    assert_eq!(storage.dedup("a", 1).unwrap(), None);
}

#[test]
fn the_entry_bound_covers_every_viewer() {
    let msg = StoredMessage {
        from: "f".repeat(MAX_ID_BYTES),
        kind: EntryKind::Message as i32,
        content_type: "t".repeat(MAX_CONTENT_TYPE_BYTES),
        body: Bytes::from(vec![1; 1000]),
        server_time_ms: u64::MAX >> MSG_ID_TIME_SHIFT,
        client_msg_id: u64::MAX,
        recalled: false,
        group_event: None,
    };
    let peer = "p".repeat(MAX_ID_BYTES);
    let conv = ConvKey::direct(&msg.from, &peer);
    let bound = entry_len_bound(&msg);
    for viewer in [msg.from.as_str(), peer.as_str()] {
        let entry = message_entry(viewer, u64::MAX, u64::MAX, &conv, msg.clone());
        assert!(
            entry.encoded_len() <= bound,
            "{} > {bound}",
            entry.encoded_len()
        );
    }
    let mut recalled = msg.clone();
    recalled.recalled = true;
    let entry = message_entry(&peer, u64::MAX, u64::MAX, &conv, recalled.clone());
    assert!(entry.encoded_len() <= entry_len_bound(&recalled));
    assert!(bound < msg.encoded_len() + 128, "the bound stays close");
}

#[test]
fn ids_names_and_content_types_over_their_limits_are_refused() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    let long = "x".repeat(300);
    let mut ct = send("a", 1, "b");
    if let Op::Send { content_type, .. } = &mut ct {
        *content_type = "c".repeat(MAX_CONTENT_TYPE_BYTES + 1);
    }
    let ops = vec![
        send("a", 1, &long),
        send(&long, 1, "b"),
        ct,
        create("a", &"g".repeat(65), "G", &[]),
        create("a", "g", &"n".repeat(MAX_GROUP_NAME_BYTES + 1), &[]),
        create("a", "g", "G", &[long.as_str()]),
        create("a", "g", "G", &[""]),
        Op::Ack {
            user: "a".into(),
            device: long.as_str().into(),
            seq: 1,
        },
    ];
    for outcome in batch(&mut w, ops) {
        assert_eq!(refused(&outcome), ErrorCode::InvalidRequest);
    }
    assert_eq!(storage.max_seq("b").unwrap(), 0);
    assert_eq!(storage.max_seq(&long).unwrap(), 0);
    assert!(storage.group("g").unwrap().is_none());
    let out = batch(
        &mut w,
        vec![create("a", "g", &"n".repeat(MAX_GROUP_NAME_BYTES), &[])],
    );
    assert!(matches!(out[0], Outcome::GroupChanged { .. }));
}

#[test]
fn create_obeys_the_per_change_member_limit() {
    let options = CommitOptions {
        max_users_per_change: 3,
        ..Default::default()
    };
    let (_dir, storage, mut w) = worker(options);
    let out = batch(&mut w, vec![create("o", "g", "G", &["a", "b", "c", "d"])]);
    assert_eq!(refused(&out[0]), ErrorCode::InvalidRequest);
    assert!(storage.group("g").unwrap().is_none());
    assert_eq!(storage.max_seq("a").unwrap(), 0);
    let out = batch(&mut w, vec![create("o", "g", "G", &["a", "b", "c"])]);
    assert!(matches!(out[0], Outcome::GroupChanged { .. }));
    assert_eq!(
        CommitOptions::default().max_users_per_change,
        limits::MAX_USERS_PER_CHANGE
    );
}

#[test]
fn a_dissolved_groups_id_is_never_reused() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    let to_g = Op::Send {
        from: "o".into(),
        client_msg_id: 1,
        to: Target::Group("g".into()),
        content_type: String::new(),
        body: Bytes::from_static(b"secret"),
        system: false,
    };
    let dissolve = || {
        group_op(
            "o",
            GroupChange::Dissolve {
                group_id: "g".into(),
            },
        )
    };
    batch(&mut w, vec![create("o", "g", "G", &["m"]), to_g]);
    let out = batch(&mut w, vec![dissolve()]);
    assert!(matches!(out[0], Outcome::GroupChanged { group: None, .. }));
    assert!(storage.group("g").unwrap().is_none());
    assert!(storage.group_tombstone("g").unwrap().is_some());
    // The history is still stored, but nobody can become a member.
    let out = batch(&mut w, vec![create("intruder", "g", "G", &[])]);
    let Outcome::Refused(r) = &out[0] else {
        panic!("{:?}", out[0])
    };
    assert_eq!(r.code, ErrorCode::GroupExists);
    assert!(r.message.contains("never reused"), "{}", r.message);
    assert!(storage.group("g").unwrap().is_none());
    assert!(matches!(storage.group_if_cached("g"), Some(None)));

    // Dissolved and re-created in one batch: refused too.
    batch(&mut w, vec![create("o", "h", "H", &[])]);
    let out = batch(
        &mut w,
        vec![
            group_op(
                "o",
                GroupChange::Dissolve {
                    group_id: "h".into(),
                },
            ),
            create("o", "h", "H", &[]),
        ],
    );
    assert_eq!(refused(&out[1]), ErrorCode::GroupExists);

    // A group dissolved before tombstones existed: its messages still
    // keep the id.
    storage
        .db
        .delete_cf(storage.cf(cf::GROUPS), keys::group_tombstone_key("g"))
        .unwrap();
    let out = batch(&mut w, vec![create("intruder", "g", "G", &[])]);
    assert_eq!(refused(&out[0]), ErrorCode::GroupExists);
}

#[test]
fn the_seq_map_stays_bounded_and_seqs_stay_right_after_eviction() {
    let options = CommitOptions {
        seq_cache_entries: 10,
        ..Default::default()
    };
    let (_dir, storage, mut w) = worker(options);
    for round in 1..=3u64 {
        for i in 0..50u64 {
            let out = batch(&mut w, vec![send("s", round * 100 + i, &format!("u{i}"))]);
            assert_eq!(seq_of(&out[0], &format!("u{i}")), Some(round));
            assert_eq!(seq_of(&out[0], "s"), Some((round - 1) * 50 + i + 1));
            assert!(w.next_seq.len() <= 10, "{} entries", w.next_seq.len());
        }
    }
    assert_eq!(storage.max_seq("s").unwrap(), 150);
    // A batch touching more users than the bound is trimmed after it.
    let ops = (0..30).map(|i| send(&format!("x{i}"), 1, "s")).collect();
    batch(&mut w, ops);
    assert!(w.next_seq.len() <= 10);
    assert_eq!(storage.max_seq("s").unwrap(), 180);
}

#[test]
fn acks_of_a_batch_make_one_unsynced_put_per_device() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    let ack = |seq| Op::Ack {
        user: "u".into(),
        device: "d".into(),
        seq,
    };
    let mut state = BatchState::default();
    for seq in [5, 9, 7] {
        w.apply(ack(seq), &mut state);
    }
    assert!(
        state.writes.puts.is_empty(),
        "cursors are written at commit"
    );
    assert_eq!(state.cursors.len(), 1);
    assert!(!w.sync_batch(&state), "a batch of acks needs no fsync");
    w.commit(state, &mut Vec::<((), Outcome)>::new());
    assert_eq!(storage.cursor("u", "d").unwrap(), 9);

    let mut state = BatchState::default();
    w.apply(ack(3), &mut state);
    assert!(state.cursors.is_empty(), "a cursor never goes back");
    w.apply(send("u", 1, "v"), &mut state);
    assert!(w.sync_batch(&state), "a message is synced");
}

#[test]
fn read_receipts_reach_only_conversations_of_the_reader() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    let out = batch(&mut w, vec![send("alice", 1, "bob")]);
    let Outcome::Sent { ack, .. } = &out[0] else {
        panic!()
    };
    let msg_id = ack.msg_id;
    let read = |from: &str, to: Target, id| Op::Read {
        from: from.into(),
        to,
        up_to_msg_id: id,
    };
    let out = batch(
        &mut w,
        vec![
            // Mallory never talked to alice: alice's message to bob
            // is not in their conversation.
            read("mallory", Target::Direct("alice".into()), msg_id),
            // Alice's own message is not one bob sent her.
            read("alice", Target::Direct("bob".into()), msg_id),
            // Bob read alice's message: both get the receipt.
            read("bob", Target::Direct("alice".into()), msg_id),
        ],
    );
    assert_eq!(refused(&out[0]), ErrorCode::NoSuchMessage);
    assert_eq!(refused(&out[1]), ErrorCode::NoSuchMessage);
    assert_eq!(seq_of(&out[2], "alice"), Some(2));
    assert_eq!(seq_of(&out[2], "bob"), Some(2));
    assert_eq!(storage.max_seq("alice").unwrap(), 2);
    assert_eq!(storage.max_seq("mallory").unwrap(), 0);

    batch(&mut w, vec![create("o", "g", "G", &["m"])]);
    let out = batch(
        &mut w,
        vec![
            read("mallory", Target::Group("g".into()), 1),
            read("m", Target::Group("g".into()), 1),
            read("m", Target::Group("nope".into()), 1),
        ],
    );
    assert_eq!(refused(&out[0]), ErrorCode::NotAMember);
    assert_eq!(seq_of(&out[1], "m"), Some(2));
    assert_eq!(refused(&out[2]), ErrorCode::NoSuchGroup);
    assert_eq!(storage.max_seq("mallory").unwrap(), 0);
}

#[test]
fn the_group_cache_stays_bounded_and_right() {
    let (_dir, storage, mut w) = worker_with(
        CommitOptions::default(),
        StorageOptions {
            group_cache_members: 20,
            ..Default::default()
        },
    );
    for i in 0..40 {
        batch(
            &mut w,
            vec![create("o", &format!("g{i}"), "G", &["a", "b"])],
        );
        assert!(storage.group_cache_size().1 <= 20);
    }
    for i in (0..40).rev() {
        let g = storage.group(&format!("g{i}")).unwrap().unwrap();
        assert_eq!(g.members.len(), 3);
        assert!(storage.group(&format!("nope{i}")).unwrap().is_none());
        let (entries, weight) = storage.group_cache_size();
        assert!(weight <= 20 && entries <= 20, "{entries} entries, {weight}");
    }
}

#[test]
fn unknown_ids_are_cached_as_absent_until_created() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    assert!(storage.group_if_cached("g").is_none());
    assert!(storage.group("g").unwrap().is_none());
    assert!(matches!(storage.group_if_cached("g"), Some(None)));
    // Known absent: no database read (one would fail now).
    fail_reads(&storage, "group", "g");
    assert!(storage.group("g").unwrap().is_none());
    heal(&storage);
    batch(&mut w, vec![create("o", "g", "G", &[])]);
    assert!(matches!(storage.group_if_cached("g"), Some(Some(_))));
    assert!(matches!(
        storage.group_if_cached(&"x".repeat(300)),
        Some(None)
    ));
}

#[test]
fn a_load_that_raced_a_dissolve_does_not_bring_the_group_back() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    batch(&mut w, vec![create("o", "g", "G", &["m"])]);
    // Start from a cold cache, so the reader below loads from the DB.
    *storage.groups.write().unwrap() = crate::groups::GroupCache::new(1000);
    let (loaded_tx, loaded) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    *storage.faults.after_group_load.lock().unwrap() = Some(Box::new(move || {
        loaded_tx.send(()).unwrap();
        go_rx.recv().unwrap();
    }));
    let reader = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.group("g").unwrap())
    };
    // The reader has loaded the group and waits before filling the cache.
    loaded.recv().unwrap();
    let out = batch(
        &mut w,
        vec![group_op(
            "o",
            GroupChange::Dissolve {
                group_id: "g".into(),
            },
        )],
    );
    assert!(matches!(out[0], Outcome::GroupChanged { group: None, .. }));
    go.send(()).unwrap();
    let stale = reader.join().unwrap();
    assert!(stale.is_some(), "the reader loaded before the dissolve");
    assert!(
        storage.group("g").unwrap().is_none(),
        "the stale load was put back into the cache"
    );
    assert!(matches!(storage.group_if_cached("g"), Some(None)));
}

#[test]
fn over_long_ids_read_as_nothing_stored() {
    let (_dir, storage, mut w) = worker(CommitOptions::default());
    // 300 bytes: a length byte would hold 300 % 256 = 44 of them.
    let long = "x".repeat(300);
    let short = "x".repeat(44);
    batch(&mut w, vec![send(&short, 1, &short)]);
    assert_eq!(storage.max_seq(&long).unwrap(), 0);
    let page = storage.read_inbox(&long, 0, 10).unwrap();
    assert!(page.entries.is_empty() && !page.has_more);
    assert_eq!(storage.cursor(&long, "d").unwrap(), 0);
    assert_eq!(storage.cursor("u", &long).unwrap(), 0);
    assert_eq!(storage.dedup(&long, 1).unwrap(), None);
    assert!(storage.group(&long).unwrap().is_none());
    assert_eq!(storage.group_tombstone(&long).unwrap(), None);
    let conv = ConvKey::direct(&long, &short);
    assert_eq!(storage.message(&conv, 1).unwrap(), None);
    assert!(storage.history(&short, &conv, 0, 10).unwrap().0.is_empty());
    let group_conv = ConvKey::Group(long.clone());
    assert!(
        storage
            .history(&short, &group_conv, 0, 10)
            .unwrap()
            .0
            .is_empty()
    );
    // And the committer stores nothing under such an id.
    let out = batch(&mut w, vec![send(&short, 2, &long)]);
    assert_eq!(refused(&out[0]), ErrorCode::InvalidRequest);
    assert_eq!(storage.max_seq(&short).unwrap(), 1);
}

#[test]
fn sorted_writes_keep_the_order_of_puts_and_deletes_of_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
    let mut writes = SortedWrites::default();
    writes.put(cf::GROUPS, b"b".to_vec(), b"1".to_vec());
    writes.put(cf::GROUPS, b"a".to_vec(), b"1".to_vec());
    writes.delete(cf::GROUPS, b"a".to_vec());
    writes.put(cf::GROUPS, b"b".to_vec(), b"2".to_vec());
    writes.delete(cf::GROUPS, b"c".to_vec());
    writes.put(cf::GROUPS, b"c".to_vec(), b"3".to_vec());
    writes.put(cf::META, b"a".to_vec(), b"m".to_vec());
    let batch = writes.into_write_batch(&storage);
    storage.db.write(batch).unwrap();
    let get = |cf_name, key: &[u8]| storage.db.get_cf(storage.cf(cf_name), key).unwrap();
    assert_eq!(get(cf::GROUPS, b"a"), None, "the delete came after the put");
    assert_eq!(get(cf::GROUPS, b"b").as_deref(), Some(&b"2"[..]));
    assert_eq!(get(cf::GROUPS, b"c").as_deref(), Some(&b"3"[..]));
    assert_eq!(get(cf::META, b"a").as_deref(), Some(&b"m"[..]));
}

/// Two nodes, seen from `this`: users and groups whose ids start with
/// `n1-` live on node 1, all others on node 2.
#[derive(Debug)]
struct TwoNodes {
    this: NodeId,
}

impl Homes for TwoNodes {
    fn this_node(&self) -> NodeId {
        self.this
    }
    fn home_of_user(&self, user: &str) -> NodeId {
        if user.starts_with("n1-") { 1 } else { 2 }
    }
    fn owner_of_group(&self, group: &str) -> NodeId {
        self.home_of_user(group)
    }
}

fn node_options(this: NodeId) -> CommitOptions {
    CommitOptions {
        homes: Some(Arc::new(TwoNodes { this })),
        node_id: this,
        max_group_members: 20_000,
        max_users_per_change: 10_000,
        ..CommitOptions::default()
    }
}

/// Applies `ops` as one batch and commits it: the outcomes and the link
/// batches for peers.
fn batch_with_links(worker: &mut Worker, ops: Vec<Op>) -> (Vec<Outcome>, Vec<LinkOut>) {
    let mut state = BatchState::default();
    let mut results: Vec<((), Outcome)> = ops
        .into_iter()
        .map(|op| ((), worker.apply(op, &mut state)))
        .collect();
    let links = worker.commit(state, &mut results);
    (results.into_iter().map(|(_, o)| o).collect(), links)
}

/// The `ApplyLink` op a peer makes of a link batch it received.
fn apply_op(link: &LinkOut) -> Op {
    let envelope = ferry_protocol::bus::decode_envelope(&link.envelope).unwrap();
    let Some(ferry_protocol::bus::envelope::Body::LinkBatch(batch)) = envelope.body else {
        panic!("not a link batch: {:?}", envelope.body);
    };
    Op::ApplyLink {
        from: envelope.from_node as NodeId,
        epoch: batch.epoch,
        batch,
        head: Default::default(),
    }
}

fn link_fanouts(outcome: &Outcome) -> &[Fanout] {
    match outcome {
        Outcome::Link(LinkOutcome::Applied { fanouts, .. }) => fanouts,
        other => panic!("link batch not applied: {other:?}"),
    }
}

/// A group message whose entries for one peer fill several link batches
/// (8,200 members there): the peer applies all of them in one write, and
/// every member's entry is pushed live, in seq order. Before link batches
/// carried their entries' rows, the entries of the second batch pointed at
/// a row only staged by the first: stored, but never pushed.
#[test]
fn a_group_message_split_over_link_batches_reaches_every_remote_member_live() {
    let (_d1, _s1, mut node1) = worker(node_options(1));
    let (_d2, _s2, mut node2) = worker(node_options(2));
    // 64-byte ids: 8,200 of them are more than one link batch of entries.
    let members: Vec<String> = (0..8_200).map(|i| format!("{i:064}")).collect();
    // Added 500 at a time: a group event names the users it adds, and
    // an event must fit a frame.
    let mut ops = vec![create("n1-owner", "n1-g", "big", &[])];
    for chunk in members.chunks(500) {
        ops.push(group_op(
            "n1-owner",
            GroupChange::Add {
                group_id: "n1-g".into(),
                members: chunk.to_vec(),
            },
        ));
    }
    let (outcomes, mut links) = batch_with_links(&mut node1, ops);
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::GroupChanged { .. }),
            "{outcome:?}"
        );
    }
    let message = Op::Send {
        from: "n1-owner".into(),
        client_msg_id: 1,
        to: Target::Group("n1-g".into()),
        content_type: "text/plain".into(),
        body: Bytes::from_static(b"to everyone"),
        system: false,
    };
    let (outcomes, message_links) = batch_with_links(&mut node1, vec![message]);
    let Outcome::Sent { ack, .. } = &outcomes[0] else {
        panic!("{outcomes:?}")
    };
    let msg_id = ack.msg_id;
    assert!(
        message_links.len() >= 2,
        "the entries span {} link batches",
        message_links.len()
    );
    links.extend(message_links);

    let ops = links.iter().map(apply_op).collect();
    let (outcomes, _) = batch_with_links(&mut node2, ops);
    let mut seqs: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut reached = 0;
    for outcome in &outcomes {
        for fanout in link_fanouts(outcome) {
            if fanout.entry.msg_id == msg_id {
                reached += fanout.targets.len();
            }
            for (user, seq) in &fanout.targets {
                seqs.entry(user.as_ref()).or_default().push(*seq);
            }
        }
    }
    assert_eq!(reached, members.len(), "members whose entry is pushed live");
    for (user, seqs) in seqs {
        assert!(
            seqs.is_sorted(),
            "{user}: pushed out of seq order: {seqs:?}"
        );
    }
}

/// One link batch with a group entry for carol and bob and, between them, a
/// direct entry for bob: bob's entries are pushed in seq order (a push that
/// skips ahead makes the device fall back to a sync).
#[test]
fn a_link_batch_pushes_each_users_entries_in_seq_order() {
    let (_d1, _s1, mut node1) = worker(node_options(1));
    let (_d2, _s2, mut node2) = worker(node_options(2));
    let (_, mut links) = batch_with_links(
        &mut node1,
        vec![create("n1-owner", "n1-g", "g", &["carol", "bob"])],
    );
    let to_group = Op::Send {
        from: "n1-owner".into(),
        client_msg_id: 1,
        to: Target::Group("n1-g".into()),
        content_type: "text/plain".into(),
        body: Bytes::from_static(b"group"),
        system: false,
    };
    let (_, more) = batch_with_links(&mut node1, vec![to_group, send("n1-alice", 1, "bob")]);
    links.extend(more);
    // Reorder the group message's entries so that carol's comes first and
    // bob's after his direct entry, as a batch of several ops can.
    let mut ops: Vec<Op> = links.iter().map(apply_op).collect();
    if let Some(Op::ApplyLink { batch, .. }) = ops.last_mut() {
        let direct = batch
            .appends
            .iter()
            .position(|a| a.users == ["bob"])
            .unwrap();
        let direct = batch.appends.remove(direct);
        let group = batch.appends.iter().position(|a| a.users.len() == 2);
        if let Some(group) = group {
            let mut carol = batch.appends[group].clone();
            carol.users = vec!["carol".into()];
            let mut bob = batch.appends[group].clone();
            bob.users = vec!["bob".into()];
            batch.appends.splice(group..=group, [carol, direct, bob]);
        } else {
            panic!("no group entry for carol and bob: {:?}", batch.appends);
        }
    }
    let (outcomes, _) = batch_with_links(&mut node2, ops);
    let bob: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| link_fanouts(o).iter())
        .flat_map(|f| f.targets.iter())
        .filter(|(u, _)| u.as_ref() == "bob")
        .map(|(_, seq)| *seq)
        .collect();
    assert_eq!(
        bob.len(),
        3,
        "the group event, the direct message, the group message"
    );
    assert!(
        bob.is_sorted(),
        "bob's entries pushed out of order: {bob:?}"
    );
}

/// A panic on the delivery thread (here: in the sink) ends the process
/// instead of leaving a node that takes no writes while looking alive. The
/// test runs itself again as a child that starts a committer whose sink
/// panics, and checks that the child died of SIGABRT.
#[test]
fn a_panicking_delivery_thread_aborts_the_process() {
    const CHILD: &str = "FERRY_TEST_PANICKING_SINK";
    if std::env::var_os(CHILD).is_some() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let committer =
            Committer::start(storage, CommitOptions::default(), |_: Vec<((), _)>, _| {
                panic!("sink bug")
            })
            .unwrap();
        committer
            .blocking_submit(send("alice", 1, "bob"), ())
            .unwrap();
        // Without the abort, the stop fails (the delivery thread is gone)
        // or returns, and the child exits with a code instead of a signal.
        let stopped = committer.blocking_stop();
        std::process::exit(if stopped.is_ok() { 0 } else { 3 });
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "commit::tests::a_panicking_delivery_thread_aborts_the_process",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        child.status.signal(),
        Some(6),
        "the child was not aborted: {:?}\n{}",
        child.status,
        String::from_utf8_lossy(&child.stderr)
    );
}
