//! The account's certificates and their things, read from the IoT control plane with
//! `aws-sdk-iot`: `ListCertificates` (every page), then `ListPrincipalThings` for each
//! certificate whose things are not known yet (a few at a time).

use std::collections::HashMap;

use aws_sdk_iot::error::DisplayErrorContext;
use futures_util::StreamExt as _;

use crate::auth::registry::{Registered, Snapshot};

/// Certificates per `ListCertificates` page (the API's most).
const PAGE_SIZE: i32 = 250;
/// `ListPrincipalThings` calls in flight at once.
const CONCURRENT_CALLS: usize = 8;

/// What one read found.
pub struct Read {
    /// By certificate id.
    pub certificates: HashMap<String, Registered>,
}

/// The IoT control plane.
pub struct ControlPlane {
    client: aws_sdk_iot::Client,
}

impl ControlPlane {
    /// Calls through `aws`, at `endpoint` when given.
    pub fn new(aws: &aws_config::SdkConfig, endpoint: Option<&str>) -> ControlPlane {
        let mut config = aws_sdk_iot::config::Builder::from(aws);
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        ControlPlane {
            client: aws_sdk_iot::Client::from_conf(config.build()),
        }
    }

    /// Every certificate with its status and things; the things of a certificate `known`
    /// has with the same status are taken from there rather than asked again.
    pub async fn read(&self, known: Option<&Snapshot>) -> Result<Read, String> {
        let mut listed = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .client
                .list_certificates()
                .page_size(PAGE_SIZE)
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| format!("ListCertificates: {}", DisplayErrorContext(&e)))?;
            for certificate in page.certificates() {
                let (Some(id), Some(arn)) =
                    (certificate.certificate_id(), certificate.certificate_arn())
                else {
                    continue;
                };
                let status = certificate
                    .status()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default();
                listed.push((id.to_ascii_lowercase(), arn.to_string(), status));
            }
            marker = page.next_marker().map(str::to_string);
            if marker.is_none() {
                break;
            }
        }
        let asked = futures_util::stream::iter(listed)
            .map(|(id, arn, status)| async move {
                let kept = known
                    .and_then(|k| k.certificates.get(&id))
                    .filter(|k| k.status == status)
                    .map(|k| k.things.clone());
                let things = match kept {
                    Some(things) => things,
                    None => self.things_of(&arn).await?,
                };
                Ok::<_, String>((id, Registered { status, things }))
            })
            .buffer_unordered(CONCURRENT_CALLS)
            .collect::<Vec<_>>()
            .await;
        let certificates = asked.into_iter().collect::<Result<_, _>>()?;
        Ok(Read { certificates })
    }

    /// The things attached to the certificate `arn`.
    async fn things_of(&self, arn: &str) -> Result<Vec<String>, String> {
        let mut things = Vec::new();
        let mut next = None;
        loop {
            let page = self
                .client
                .list_principal_things()
                .principal(arn)
                .set_next_token(next)
                .send()
                .await
                .map_err(|e| format!("ListPrincipalThings: {}", DisplayErrorContext(&e)))?;
            things.extend(page.things().iter().cloned());
            next = page.next_token().map(str::to_string);
            if next.is_none() {
                return Ok(things);
            }
        }
    }
}
