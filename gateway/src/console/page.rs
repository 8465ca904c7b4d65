//! The console's page and assets, embedded in the binary at build time (nothing is
//! fetched from elsewhere, at build or at run time): `GET /` (the page, a sign-in form
//! until the admin token is given), `GET /console/{file}` (its script, stylesheet and
//! the vendored uPlot with its licence).
//!
//! They hold no data and are served without the token; everything the page shows comes
//! from admin routes that need it. The Content-Security-Policy lets the page load
//! nothing from anywhere but this listener.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The files, by the name they are served under: (name, content type, bytes).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("assets/vendor/uPlot.min.css"),
    ),
    (
        "uPlot.LICENSE",
        "text/plain; charset=utf-8",
        include_str!("assets/vendor/uPlot.LICENSE"),
    ),
];

const INDEX: &str = include_str!("assets/index.html");

/// Nothing from elsewhere: scripts, styles, data and images from this listener only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; form-action 'none'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// `GET /` and `GET /console/{file}`.
pub fn router() -> axum::Router {
    axum::Router::new()
        .route(
            "/",
            get(|| async { serve("text/html; charset=utf-8", INDEX) }),
        )
        .route("/console/{file}", get(asset))
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => serve(content_type, body),
        None => (StatusCode::NOT_FOUND, "no such console file").into_response(),
    }
}

fn serve(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    async fn get(path: &str) -> (StatusCode, String, String) {
        let response = router()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let kind = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, kind, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_page_loads_only_its_own_assets() {
        let (status, kind, page) = get("/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(kind.starts_with("text/html"));
        for (name, _, _) in ASSETS.iter().filter(|(n, _, _)| !n.ends_with("LICENSE")) {
            assert!(
                page.contains(&format!("/console/{name}")),
                "{name} is linked"
            );
            let (status, _, body) = get(&format!("/console/{name}")).await;
            assert_eq!(status, StatusCode::OK, "{name}");
            assert!(!body.is_empty());
        }
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no outside URL"
        );
        assert_eq!(get("/console/nope.js").await.0, StatusCode::NOT_FOUND);
        assert!(
            get("/console/uPlot.LICENSE")
                .await
                .2
                .contains("MIT License")
        );
    }
}
