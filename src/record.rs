//! A message as the dispatcher handles it: read back from the store with its identity.

use std::time::SystemTime;

use uuid::Uuid;

use crate::message::Message;

/// A claimed outbox row: what a [`Store`](crate::Store) hands the dispatcher and the
/// dispatcher hands a [`Broker`](crate::Broker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The row's id: the order in which messages were added.
    pub id: u64,
    /// The message id returned by [`Outbox::add`](crate::Outbox::add) and sent in the
    /// [`MESSAGE_ID_HEADER`](crate::MESSAGE_ID_HEADER) header.
    pub message_id: Uuid,
    /// Failed sends so far.
    pub attempts: u32,
    /// When the message was added: its row's `created_on`, the database's clock.
    /// [`KafkaBroker`](crate::KafkaBroker) gives it to the record as its timestamp.
    pub created: SystemTime,
    /// The message as it was added.
    pub message: Message,
}
