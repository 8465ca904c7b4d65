//! IoT Core over HTTPS: the IoT data-plane `Publish` call through the AWS SDK, with the
//! message's MQTT 5 properties (content type, response topic, correlation data, message
//! expiry, payload format, user properties) as the call's parameters.

use aws_sdk_iotdataplane::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_iotdataplane::operation::publish::builders::PublishFluentBuilder;
use aws_sdk_iotdataplane::primitives::Blob;
use aws_sdk_iotdataplane::types::PayloadFormatIndicator;

use crate::message::{Message, attribute};
use crate::record::Record;
use crate::sink::iot_core::prepare;
use crate::sink::{Rejected, SinkError, SinkFuture};

/// `call` with `message`'s MQTT 5 properties, from its content type and its `mqtt.*`
/// attributes (kept in the forms this API takes, but the user properties, which the
/// SDK encodes itself).
fn with_properties(mut call: PublishFluentBuilder, message: &Message) -> PublishFluentBuilder {
    use base64::Engine as _;
    if !message.content_type.is_empty() {
        call = call.content_type(&message.content_type);
    }
    for (key, value) in &message.attributes {
        call = match key.as_str() {
            attribute::RESPONSE_TOPIC => call.response_topic(value),
            attribute::CORRELATION_DATA => call.correlation_data(value),
            attribute::MESSAGE_EXPIRY => match value.parse() {
                Ok(secs) => call.message_expiry(secs),
                Err(_) => call,
            },
            attribute::PAYLOAD_FORMAT_INDICATOR => {
                call.payload_format_indicator(PayloadFormatIndicator::from(value.as_str()))
            }
            attribute::USER_PROPERTIES => {
                let json = base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok());
                match json {
                    Some(json) => call.user_properties(json),
                    None => call,
                }
            }
            _ => call,
        };
    }
    call
}

/// Publishes each record with one `Publish` call, concurrently.
pub struct HttpsSink {
    /// The SDK client.
    client: aws_sdk_iotdataplane::Client,
    /// Basic Ingest rule name, if configured.
    basic_ingest_rule: Option<String>,
    /// How long a request waits for IoT Core's answers.
    delivery_timeout: std::time::Duration,
}

impl HttpsSink {
    /// A sink using the shared AWS configuration.
    pub fn new(
        config: &aws_config::SdkConfig,
        basic_ingest_rule: Option<String>,
        delivery_timeout: std::time::Duration,
    ) -> HttpsSink {
        let client = aws_sdk_iotdataplane::Client::new(config);
        HttpsSink {
            client,
            basic_ingest_rule,
            delivery_timeout,
        }
    }

    /// Publishes `records`; answers when IoT Core confirmed each (HTTP 200).
    pub fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_> {
        Box::pin(async move {
            let mut rejected = Vec::new();
            let mut calls = Vec::new();
            for record in records {
                match prepare(&record, self.basic_ingest_rule.as_deref()) {
                    Ok(publish) => {
                        let call = self
                            .client
                            .publish()
                            .topic(publish.topic)
                            .qos(i32::from(publish.qos))
                            .retain(publish.retain)
                            .payload(Blob::new(publish.payload));
                        let call = with_properties(call, &record.message).send();
                        calls.push((record, call));
                    }
                    Err(reason) => rejected.push(Rejected { record, reason }),
                }
            }
            let (records, calls): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
            let all = futures_util::future::join_all(calls);
            let Ok(answers) = tokio::time::timeout(self.delivery_timeout, all).await else {
                return Err(SinkError::Unavailable(format!(
                    "IoT Core did not answer every publish within {:?}",
                    self.delivery_timeout
                )));
            };
            let mut unavailable = None;
            for (record, answer) in records.into_iter().zip(answers) {
                match answer {
                    Ok(_) => {}
                    Err(SdkError::ServiceError(context)) if !is_transient(context.err().code()) => {
                        let reason = format!(
                            "IoT Core refused the publish: {}: {}",
                            context.err().code().unwrap_or("error"),
                            context.err().message().unwrap_or_default()
                        );
                        rejected.push(Rejected { record, reason });
                    }
                    Err(error) => unavailable = Some(DisplayErrorContext(&error).to_string()),
                }
            }
            match unavailable {
                Some(error) => Err(SinkError::Unavailable(format!(
                    "IoT Core publish failed: {error}"
                ))),
                None => Ok(rejected),
            }
        })
    }
}

fn is_transient(code: Option<&str>) -> bool {
    matches!(
        code,
        None | Some(
            "ThrottlingException" | "ServiceUnavailableException" | "InternalFailureException"
        )
    )
}

impl crate::sink::Sink for HttpsSink {
    fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_> {
        HttpsSink::deliver(self, records)
    }
}
