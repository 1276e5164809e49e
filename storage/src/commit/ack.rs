//! `Op::Ack`: a device's cumulative ack moves its cursor.

use super::*;

impl Worker {
    /// A device's cumulative ack: moves its cursor forward in the batch
    /// (written once per device at commit).
    pub(super) fn ack(
        &mut self,
        user: Arc<str>,
        device: Arc<str>,
        seq: u64,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let key = (user, device);
        let current = match state.cursors.get(&key) {
            Some(v) => *v,
            None => self.storage.cursor(&key.0, &key.1)?,
        };
        if seq > current {
            let previous = state.cursors.insert(key.clone(), seq);
            self.undo.cursors.push((key, previous));
        }
        Ok(Outcome::Applied {
            fanouts: Vec::new(),
        })
    }
}
