//! The AWS SDK's shared configuration for the cloud sinks: the standard credential
//! chain, the configured region and endpoint, rustls with ring for TLS, bounded calls, and
//! no SDK retries (the sinks retry per record).

use crate::config::AwsConfig;

/// The shared AWS configuration of `[aws]`.
pub async fn sdk_config(aws: &AwsConfig) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls;

    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https(); // Bounded calls: a hung connection must not stall a sink past its delivery timeout.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .operation_attempt_timeout(std::time::Duration::from_secs(10))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts)
        .retry_config(aws_config::retry::RetryConfig::disabled());
    if let Some(region) = &aws.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &aws.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// `shared` with `endpoint` instead of its own, when a sink names one.
pub fn with_endpoint(
    shared: &aws_config::SdkConfig,
    endpoint: Option<&str>,
) -> aws_config::SdkConfig {
    match endpoint {
        Some(url) => shared.to_builder().endpoint_url(url).build(),
        None => shared.clone(),
    }
}
