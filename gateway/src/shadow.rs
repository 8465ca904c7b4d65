//! Device Shadow over HTTPS: IoT Core's data-plane shadow calls (get, update and delete a
//! thing's shadow, classic or named; list its named shadows), made for a device with
//! the gateway's AWS credentials through `aws-sdk-iotdataplane`, and IoT Core's answer
//! handed back as it came: the status, the body, the error type.
//!
//! The device's permission is Sluice's policy, checked before a call is made (by the
//! HTTP routes that take the devices' calls); IoT Core sees the gateway's credentials,
//! which must allow `iot:GetThingShadow`, `iot:UpdateThingShadow`,
//! `iot:DeleteThingShadow` and `iot:ListNamedShadowsForThing` on the fleet's things.

use aws_sdk_iotdataplane::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_iotdataplane::primitives::Blob;

/// Longest thing name IoT Core takes.
const MAX_THING_NAME: usize = 128;
/// Longest shadow name IoT Core takes.
const MAX_SHADOW_NAME: usize = 64;

/// One shadow call.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `GetThingShadow`.
    Get,
    /// `UpdateThingShadow` with this document.
    Update(Vec<u8>),
    /// `DeleteThingShadow`.
    Delete,
}

impl Call {
    /// The last level of the MQTT topic that makes the same request (`…/shadow/get`),
    /// which the device's policy grants or not.
    pub fn verb(&self) -> &'static str {
        match self {
            Call::Get => "get",
            Call::Update(_) => "update",
            Call::Delete => "delete",
        }
    }
}

/// Which shadow: a thing's classic shadow (`name` none) or one of its named shadows.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowId {
    /// The thing.
    pub thing: String,
    /// The named shadow, `None` for the classic one.
    pub name: Option<String>,
}

impl ShadowId {
    /// A shadow id, checked as IoT Core checks it (thing names of 1 to 128 and shadow
    /// names of 1 to 64 of `a-z A-Z 0-9 : _ -`), so that neither can reach into another
    /// topic level.
    pub fn new(thing: &str, name: Option<&str>) -> Result<ShadowId, String> {
        check_name("thing name", thing, MAX_THING_NAME)?;
        if let Some(name) = name {
            check_name("shadow name", name, MAX_SHADOW_NAME)?;
        }
        Ok(ShadowId {
            thing: thing.to_string(),
            name: name.map(str::to_string),
        })
    }

    /// The MQTT topic of the same request: `$aws/things/{thing}/shadow[/name/{name}]/{verb}`.
    pub fn topic(&self, verb: &str) -> String {
        match &self.name {
            Some(name) => format!("$aws/things/{}/shadow/name/{name}/{verb}", self.thing),
            None => format!("$aws/things/{}/shadow/{verb}", self.thing),
        }
    }
}

/// Thing and shadow names: what IoT Core's API takes.
fn check_name(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() || value.len() > max {
        return Err(format!("the {what} must be 1 to {max} characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
    {
        return Err(format!(
            "the {what} `{value}` may hold only letters, digits, `:`, `_` and `-`"
        ));
    }
    Ok(())
}

/// What IoT Core answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `200` with this JSON body (the shadow document, or IoT Core's list).
    Ok(Vec<u8>),
    /// IoT Core's error, as it sent it.
    Refused {
        /// Its HTTP status.
        status: u16,
        /// Its error type (`ResourceNotFoundException`, `ConflictException`, …).
        error_type: String,
        /// Its body (`{"code":…,"message":…}`).
        body: Vec<u8>,
    },
}

/// IoT Core could not be asked or did not answer (no connection, a timeout).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("IoT Core's data plane did not answer: {0}")]
pub struct Unreachable(String);

/// The data plane's shadow calls.
pub struct Shadows {
    client: aws_sdk_iotdataplane::Client,
}

impl Shadows {
    /// Calls through `config` (its endpoint is IoT Core's data plane).
    pub fn new(config: &aws_config::SdkConfig) -> Shadows {
        Shadows {
            client: aws_sdk_iotdataplane::Client::new(config),
        }
    }

    /// Makes `call` on `shadow`.
    pub async fn call(&self, shadow: &ShadowId, call: Call) -> Result<Answer, Unreachable> {
        let thing = shadow.thing.clone();
        let name = shadow.name.clone();
        let payload = |blob: Option<&Blob>| blob.map(|b| b.as_ref().to_vec()).unwrap_or_default();
        match call {
            Call::Get => {
                let sent = self.client.get_thing_shadow().thing_name(thing);
                let sent = sent.set_shadow_name(name).send().await;
                sent.map(|out| Answer::Ok(payload(out.payload())))
                    .or_else(refused)
            }
            Call::Update(document) => {
                let sent = self.client.update_thing_shadow().thing_name(thing);
                let sent = sent.set_shadow_name(name).payload(Blob::new(document));
                sent.send()
                    .await
                    .map(|out| Answer::Ok(payload(out.payload())))
                    .or_else(refused)
            }
            Call::Delete => {
                let sent = self.client.delete_thing_shadow().thing_name(thing);
                let sent = sent.set_shadow_name(name).send().await;
                sent.map(|out| Answer::Ok(payload(Some(out.payload()))))
                    .or_else(refused)
            }
        }
    }

    /// `ListNamedShadowsForThing`: a page of `thing`'s named shadows, IoT Core's JSON
    /// (`results`, `nextToken`, `timestamp`).
    pub async fn list(
        &self,
        thing: &str,
        next_token: Option<String>,
        page_size: Option<i32>,
    ) -> Result<Answer, Unreachable> {
        let sent = self
            .client
            .list_named_shadows_for_thing()
            .thing_name(thing)
            .set_next_token(next_token)
            .set_page_size(page_size)
            .send()
            .await;
        sent.map(|out| {
            let mut body = serde_json::json!({
                "results": out.results(),
                "timestamp": out.timestamp(),
            });
            if let Some(token) = out.next_token() {
                body["nextToken"] = token.into();
            }
            Answer::Ok(serde_json::to_vec(&body).unwrap_or_default())
        })
        .or_else(refused)
    }
}

/// IoT Core's refusal as it sent it; anything else (no answer) is [`Unreachable`].
fn refused<E>(
    error: SdkError<E, aws_sdk_iotdataplane::config::http::HttpResponse>,
) -> Result<Answer, Unreachable>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match error {
        SdkError::ServiceError(context) => {
            let raw = context.raw();
            Ok(Answer::Refused {
                status: raw.status().as_u16(),
                error_type: context.err().code().unwrap_or("UnknownError").to_string(),
                body: raw.body().bytes().map(<[u8]>::to_vec).unwrap_or_default(),
            })
        }
        other => Err(Unreachable(DisplayErrorContext(&other).to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_reach_into_other_topic_levels_are_refused() {
        let classic = ShadowId::new("sensor-1", None).unwrap();
        assert_eq!(classic.topic("get"), "$aws/things/sensor-1/shadow/get");
        let named = ShadowId::new("sensor-1", Some("config")).unwrap();
        assert_eq!(
            named.topic(Call::Update(Vec::new()).verb()),
            "$aws/things/sensor-1/shadow/name/config/update"
        );
        for (thing, name) in [
            ("a/b", None),
            ("+", None),
            ("", None),
            ("ok", Some("x/y")),
            ("ok", Some("#")),
            ("ok", Some("")),
        ] {
            assert!(ShadowId::new(thing, name).is_err(), "{thing:?} {name:?}");
        }
        assert!(ShadowId::new(&"t".repeat(128), Some(&"n".repeat(64))).is_ok());
        assert!(ShadowId::new(&"t".repeat(129), None).is_err());
        assert!(ShadowId::new("t", Some(&"n".repeat(65))).is_err());
    }
}
