//! What an MQTT client is told about a refused publish and about a session the gateway
//! ends: the one mapping from a [`Refusal`] and from [`Ended`] to rumqttc's reason enums.
//!
//! MQTT 5 answers a refusal in the PUBACK when the specification has a PUBACK code for
//! it; a payload too large has none (0x95 is a DISCONNECT code, and paho-mqtt drops a
//! connection that gets it in a PUBACK), so it ends the connection. MQTT 3.1.1 has no
//! negative PUBACK: every refusal closes the connection.

use crate::ingress::mqtt::codec::{DisconnectReasonCode, PubAckReason};
use crate::ingress::session::Ended;
use crate::ingress::verdict::Refusal;

/// How MQTT 5 answers a refused publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A PUBACK with this reason (and the refusal's message as the reason string).
    PubAck(PubAckReason),
    /// No PUBACK code fits: DISCONNECT with this reason, after the acknowledgements of
    /// the publishes before it.
    Disconnect(DisconnectReasonCode),
}

/// The one mapping from a refusal to MQTT 5.
pub fn answer(refusal: &Refusal) -> Answer {
    match refusal {
        Refusal::Forbidden { .. } | Refusal::Reserved { .. } | Refusal::Unauthorized(_) => {
            Answer::PubAck(PubAckReason::NotAuthorized)
        }
        Refusal::RateLimited { .. } | Refusal::Unavailable { .. } => {
            Answer::PubAck(PubAckReason::QuotaExceeded)
        }
        Refusal::Plugin { .. } => Answer::PubAck(PubAckReason::ImplementationSpecificError),
        Refusal::BadTopic(_) => Answer::PubAck(PubAckReason::TopicNameInvalid),
        Refusal::BadRequest(_) => Answer::PubAck(PubAckReason::PayloadFormatInvalid),
        Refusal::TooLarge(_) => Answer::Disconnect(DisconnectReasonCode::PacketTooLarge),
    }
}

/// The DISCONNECT reason when the gateway ends a session for `ended`.
pub fn disconnect_reason(ended: &Ended) -> DisconnectReasonCode {
    match ended {
        Ended::Expired(_) | Ended::Revoked => DisconnectReasonCode::NotAuthorized,
        Ended::TakenOver => DisconnectReasonCode::SessionTakenOver,
        Ended::UpstreamLost => DisconnectReasonCode::UnspecifiedError,
        Ended::ShuttingDown => DisconnectReasonCode::ServerShuttingDown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthError;
    use crate::ingress::verdict::tests::every_refusal;

    /// The answer as the README writes it (`PUBACK 0x87`, `DISCONNECT 0x95`).
    fn describe(answer: Answer) -> String {
        match answer {
            Answer::PubAck(reason) => {
                format!(
                    "PUBACK {:#04x}",
                    crate::ingress::mqtt::codec::puback_code(reason)
                )
            }
            Answer::Disconnect(reason) => format!("DISCONNECT {:#04x}", reason as u8),
        }
    }

    /// Every refusal kind with its MQTT 5 answer.
    #[test]
    fn each_refusal_has_its_reason_code() {
        let expected = [
            ("bad_request", "PUBACK 0x99"),
            ("bad_request", "PUBACK 0x90"),
            ("missing_credentials", "PUBACK 0x87"),
            ("topic_denied", "PUBACK 0x87"),
            ("topic_reserved", "PUBACK 0x87"),
            ("rate_limited", "PUBACK 0x97"),
            ("payload_too_large", "DISCONNECT 0x95"),
            ("plugin_refused", "PUBACK 0x83"),
            ("plugin_trap", "PUBACK 0x83"),
            ("plugin_timeout", "PUBACK 0x83"),
            ("plugin_memory_limit", "PUBACK 0x83"),
            ("plugin_bad_output", "PUBACK 0x83"),
            ("plugin_unavailable", "PUBACK 0x83"),
            ("spool_full", "PUBACK 0x97"),
            ("dead_letters_full", "PUBACK 0x97"),
            ("best_effort_busy", "PUBACK 0x97"),
            ("spool_unavailable", "PUBACK 0x97"),
        ];
        let refusals = every_refusal();
        assert_eq!(refusals.len(), expected.len());
        for (refusal, (code, wire)) in refusals.iter().zip(expected) {
            assert_eq!(refusal.code(), code);
            assert_eq!(describe(answer(refusal)), wire, "{code}");
        }
    }

    #[test]
    fn each_end_has_its_disconnect_reason() {
        let cases = [
            (Ended::Expired(AuthError::TokenExpired), 0x87),
            (Ended::Revoked, 0x87),
            (Ended::TakenOver, 0x8e),
            (Ended::UpstreamLost, 0x80),
            (Ended::ShuttingDown, 0x8b),
        ];
        for (ended, reason) in cases {
            assert_eq!(disconnect_reason(&ended) as u8, reason, "{ended:?}");
        }
    }

    /// The README's MQTT refusal table says what [`answer`] does: each refusal's code is
    /// in a row whose MQTT 5 cell names its answer. (A publish is never refused for its
    /// credential: MQTT authenticates once, at CONNECT.)
    #[test]
    fn the_readme_table_matches() {
        let table = crate::testing::readme_table("| code | refusal | MQTT 5 | MQTT 3.1.1 |");
        let refusals = every_refusal().into_iter();
        for refusal in refusals.filter(|r| !matches!(r, Refusal::Unauthorized(_))) {
            let code = format!("`{}`", refusal.code());
            let wire = describe(answer(&refusal));
            // MQTT 3.1.1 has no negative PUBACK: every refusal closes the connection.
            let documented = table.iter().any(|row| {
                row[0].split(", ").any(|listed| listed == code)
                    && row[2].to_lowercase().starts_with(&wire.to_lowercase())
                    && row[3].contains("closed")
            });
            assert!(
                documented,
                "README's MQTT table: {code} should read `{wire}`"
            );
        }
    }
}
