//! `Op::Group`: create, change and dissolve groups, and the events their
//! members see (stored once in the group's log).

use super::*;

impl Worker {
    /// Whether `group_id` was ever used by a group that is gone: dissolved
    /// in this batch, tombstoned, or (for a data dir written before
    /// tombstones) still with messages in its conversation.
    pub(super) fn id_was_used(
        &self,
        group_id: &str,
        state: &BatchState,
    ) -> Result<bool, StorageError> {
        if matches!(state.groups.get(group_id), Some(None)) {
            return Ok(true);
        }
        if self.storage.group_tombstone(group_id)?.is_some() {
            return Ok(true);
        }
        self.storage
            .has_messages(&ConvKey::Group(group_id.to_owned()))
    }

    pub(super) fn group_change(
        &mut self,
        actor: Arc<str>,
        change: GroupChange,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let group_id = match &change {
            GroupChange::Create { group_id, .. } if group_id.is_empty() => self.new_group_id(),
            GroupChange::Create { group_id, .. }
            | GroupChange::Add { group_id, .. }
            | GroupChange::Remove { group_id, .. }
            | GroupChange::Leave { group_id }
            | GroupChange::Dissolve { group_id }
            | GroupChange::SetRole { group_id, .. } => group_id.clone(),
        };
        let existing = self.group_in_batch(&group_id, state)?;

        if let GroupChange::Create { name, members, .. } = change {
            return self.create_group(actor, group_id, name, members, existing, state);
        }

        let Some(existing) = existing else {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::NoSuchGroup,
                format!("no group {group_id}"),
            )));
        };
        let Some(actor_role) = existing.role(&actor) else {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::NotAMember,
                format!("not a member of {group_id}"),
            )));
        };
        let is_manager = matches!(actor_role, GroupRole::Owner | GroupRole::Admin);
        let mut group = (*existing).clone();
        // Each arm checks everything (rules, then the event's size) before
        // it stages a write.
        let (event, audience) = match change {
            GroupChange::Create { .. } => unreachable!("handled above"),
            GroupChange::Add { members, .. } => {
                if !is_manager {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner or an admin may add members",
                    )));
                }
                let added: Vec<String> = members
                    .into_iter()
                    .filter(|m| !group.is_member(m))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if group.members.len() + added.len() > self.options.max_group_members {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::GroupFull,
                        format!("at most {} members", self.options.max_group_members),
                    )));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MembersAdded as i32,
                    users: added,
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                for m in &event.users {
                    group.add(m.as_str().into(), GroupRole::Member);
                    state.put(
                        cf::GROUPS,
                        keys::group_member_key(&group_id, m),
                        [GroupRole::Member as u8],
                    );
                }
                (event, group.members.clone())
            }
            GroupChange::Remove { members, .. } => {
                if !is_manager {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner or an admin may remove members",
                    )));
                }
                let mut removed = Vec::new();
                for m in &members {
                    match group.role(m) {
                        None => continue,
                        Some(GroupRole::Owner) => {
                            return Ok(Outcome::Refused(refuse(
                                ErrorCode::PermissionDenied,
                                "the owner cannot be removed",
                            )));
                        }
                        Some(GroupRole::Admin) if actor_role != GroupRole::Owner => {
                            return Ok(Outcome::Refused(refuse(
                                ErrorCode::PermissionDenied,
                                "only the owner may remove an admin",
                            )));
                        }
                        Some(_) => removed.push(m.clone()),
                    }
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MembersRemoved as i32,
                    users: removed,
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                let audience = group.members.clone();
                for m in &event.users {
                    group.remove(m);
                    state
                        .writes
                        .delete(cf::GROUPS, keys::group_member_key(&group_id, m));
                }
                (event, audience)
            }
            GroupChange::Leave { .. } => {
                if actor_role == GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "the owner cannot leave; dissolve the group instead",
                    )));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MemberLeft as i32,
                    users: vec![actor.to_string()],
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                let audience = group.members.clone();
                group.remove(&actor);
                state
                    .writes
                    .delete(cf::GROUPS, keys::group_member_key(&group_id, &actor));
                (event, audience)
            }
            GroupChange::Dissolve { .. } => {
                if actor_role != GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner may dissolve the group",
                    )));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::Dissolved as i32,
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                let audience = group.members.clone();
                state
                    .writes
                    .delete(cf::GROUPS, keys::group_meta_key(&group_id));
                for m in &audience {
                    state
                        .writes
                        .delete(cf::GROUPS, keys::group_member_key(&group_id, m));
                }
                // The id is never used again: a new group under it would
                // show its members this group's history.
                state.put(
                    cf::GROUPS,
                    keys::group_tombstone_key(&group_id),
                    now_ms().to_be_bytes(),
                );
                let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
                self.stage_group(group_id.clone(), None, state);
                return Ok(Outcome::GroupChanged {
                    group: None,
                    group_id,
                    fanouts,
                });
            }
            GroupChange::SetRole { user, role, .. } => {
                if actor_role != GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner may change roles",
                    )));
                }
                if !matches!(role, GroupRole::Admin | GroupRole::Member) {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::InvalidRequest,
                        "role must be ADMIN or MEMBER",
                    )));
                }
                let Some(current) = group.role(&user) else {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::NotAMember,
                        format!("{user} is not a member"),
                    )));
                };
                if current == GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "the owner's role cannot change",
                    )));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::RoleChanged as i32,
                    users: vec![user.clone()],
                    role: role as i32,
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                let user: Arc<str> = user.as_str().into();
                group.roles.insert(user.clone(), role);
                state.put(
                    cf::GROUPS,
                    keys::group_member_key(&group_id, &user),
                    [role as u8],
                );
                (event, group.members.clone())
            }
        };
        let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
        let group = Arc::new(group);
        self.stage_group(group_id.clone(), Some(group.clone()), state);
        Ok(Outcome::GroupChanged {
            group: Some(group),
            group_id,
            fanouts,
        })
    }

    pub(super) fn create_group(
        &mut self,
        actor: Arc<str>,
        group_id: String,
        name: String,
        members: Vec<String>,
        existing: Option<Arc<Group>>,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        if existing.is_some() {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::GroupExists,
                format!("group {group_id} exists"),
            )));
        }
        if self.id_was_used(&group_id, state)? {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::GroupExists,
                format!("group id {group_id} was used by a dissolved group; ids are never reused"),
            )));
        }
        let mut group = Group {
            id: group_id.as_str().into(),
            meta: GroupMeta {
                name,
                owner: actor.to_string(),
                created_ms: now_ms(),
            },
            members: Vec::new(),
            roles: HashMap::new(),
        };
        group.add(actor.clone(), GroupRole::Owner);
        for m in members {
            group.add(m.into(), GroupRole::Member);
        }
        if group.members.len() > self.options.max_group_members {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::GroupFull,
                format!("at most {} members", self.options.max_group_members),
            )));
        }
        let event = proto::GroupEvent {
            kind: GroupEventKind::Created as i32,
            users: Vec::new(),
            name: group.meta.name.clone(),
            role: 0,
        };
        if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
            return Ok(Outcome::Refused(refusal));
        }
        state.put(
            cf::GROUPS,
            keys::group_meta_key(&group_id),
            group.meta.encode_to_vec(),
        );
        for m in &group.members {
            let role = group.role(m).unwrap_or(GroupRole::Member);
            state.put(
                cf::GROUPS,
                keys::group_member_key(&group_id, m),
                [role as u8],
            );
        }
        let group = Arc::new(group);
        let audience = group.members.clone();
        let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
        self.stage_group(group_id.clone(), Some(group.clone()), state);
        Ok(Outcome::GroupChanged {
            group: Some(group),
            group_id,
            fanouts,
        })
    }

    /// Stores a group event once in the group's log and points every
    /// member of `audience` at it.
    pub(super) fn group_event(
        &mut self,
        actor: &Arc<str>,
        group_id: &str,
        event: proto::GroupEvent,
        audience: &[Arc<str>],
        state: &mut BatchState,
    ) -> Result<Vec<Fanout>, StorageError> {
        let conv = ConvKey::Group(group_id.to_owned());
        let conv_bytes = conv.encode();
        let msg_id = self.next_msg_id();
        let msg = StoredMessage {
            from: actor.to_string(),
            kind: EntryKind::GroupEvent as i32,
            server_time_ms: msg_id >> MSG_ID_TIME_SHIFT,
            group_event: Some(event),
            ..Default::default()
        };
        self.put_message_row(&conv_bytes, msg_id, &msg, state);
        let pointer = InboxValue {
            conv: conv_bytes,
            msg_id,
            inline: None,
        };
        let mut targets = Vec::with_capacity(audience.len());
        for user in audience {
            if let Some(seq) = self.put_entry(user, &pointer, state)? {
                targets.push((user.clone(), seq));
            }
        }
        Ok(vec![Fanout {
            entry: message_entry(actor, 0, msg_id, &conv, msg),
            targets,
        }])
    }
}
