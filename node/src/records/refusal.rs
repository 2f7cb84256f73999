//! What a producer's error means for the record it was about, as vector's Kafka sink decides it:
//! an explicit list of errors that a later try may cure, an explicit list that no retry will,
//! and the errors that leave the producer itself unusable.
//!
//! - [`Refusal::Retriable`]: the broker is away, slow, or moving a partition (queue full,
//!   transport failure, timeouts, leader changes, not enough replicas). Keep the record (spool
//!   it, or wait) and try again later.
//! - [`Refusal::Permanent`]: this record will never be taken by this cluster (too large, invalid,
//!   not authorized, no such topic after fovea created it, a policy violation). Write a dead
//!   letter that says so instead, count it, and only then let the record go.
//! - [`Refusal::Fatal`]: the idempotent producer has lost its guarantees (librdkafka's fatal
//!   error, sequence or epoch errors) and refuses everything from now on. Rebuild it; the record
//!   itself is retried.
//!
//! Errors on neither list count as retriable: keeping a record costs disk, dead-lettering it
//! loses the image. A record that keeps failing with such an error is turned into a dead letter
//! by the caller after a bounded number of tries (see the outbox's delivery state), so it cannot
//! wedge a drain.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    Retriable,
    Permanent,
    Fatal,
}

impl Refusal {
    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Retriable => "retriable",
            Refusal::Permanent => "permanent",
            Refusal::Fatal => "fatal",
        }
    }
}

/// Whether the record was not acknowledged within librdkafka's `message.timeout.ms` (the outbox's
/// `spool.divert_after_ms`): the broker is slow or away, which the outbox tells apart by whether
/// it still answers.
pub fn timed_out(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
    )
}

/// Classifies a produce or delivery error.
pub fn classify(error: &KafkaError) -> Refusal {
    match error {
        KafkaError::MessageProduction(code) | KafkaError::Global(code) => classify_code(*code),
        _ => Refusal::Retriable,
    }
}

/// Classifies librdkafka's error code.
pub fn classify_code(code: RDKafkaErrorCode) -> Refusal {
    use RDKafkaErrorCode::*;
    match code {
        MessageSizeTooLarge
        | InvalidMessageSize
        | InvalidMessage
        | BadMessage
        | InvalidRecord
        | MessageBatchTooLarge
        | TopicAuthorizationFailed
        | ClusterAuthorizationFailed
        | UnknownTopicOrPartition
        | UnknownTopic
        | UnknownPartition
        | InvalidTopic
        | InvalidRequiredAcks
        | PolicyViolation
        | UnsupportedForMessageFormat
        | InvalidTimestamp
        | UnsupportedCompressionType
        | KeySerialization
        | ValueSerialization
        | InvalidArgument => Refusal::Permanent,
        Fatal
        | OutOfOrderSequenceNumber
        | DuplicateSequenceNumber
        | InvalidProducerEpoch
        | InvalidProducerIdMapping
        | UnknownProducerId
        | ProducerFenced
        | Fenced
        | GaplessGuarantee => Refusal::Fatal,
        _ => Refusal::Retriable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode::*;

    fn produce(code: RDKafkaErrorCode) -> Refusal {
        classify(&KafkaError::MessageProduction(code))
    }

    #[test]
    fn an_away_or_busy_broker_is_retriable() {
        for code in [
            QueueFull,
            MessageTimedOut,
            BrokerTransportFailure,
            AllBrokersDown,
            NotLeaderForPartition,
            LeaderNotAvailable,
            RequestTimedOut,
            NetworkException,
            NotEnoughReplicas,
            PurgeQueue,
            PurgeInflight,
        ] {
            assert_eq!(produce(code), Refusal::Retriable, "{code:?}");
        }
    }

    #[test]
    fn a_record_no_retry_will_cure_is_permanent() {
        for code in [
            MessageSizeTooLarge,
            InvalidMessageSize,
            InvalidRecord,
            TopicAuthorizationFailed,
            ClusterAuthorizationFailed,
            UnknownTopicOrPartition,
            PolicyViolation,
        ] {
            assert_eq!(produce(code), Refusal::Permanent, "{code:?}");
        }
    }

    #[test]
    fn a_producer_that_lost_its_guarantees_is_fatal() {
        for code in [
            Fatal,
            OutOfOrderSequenceNumber,
            InvalidProducerEpoch,
            ProducerFenced,
        ] {
            assert_eq!(produce(code), Refusal::Fatal, "{code:?}");
            assert_eq!(classify(&KafkaError::Global(code)), Refusal::Fatal);
        }
    }

    #[test]
    fn anything_else_is_retried() {
        assert_eq!(produce(Unknown), Refusal::Retriable);
        assert_eq!(classify(&KafkaError::Canceled), Refusal::Retriable);
        assert_eq!(
            classify(&KafkaError::ClientCreation("x".into())),
            Refusal::Retriable
        );
    }
}
