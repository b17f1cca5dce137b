//! The files under `web/` that the bridge serves: the fleet dashboard at `/`,
//! the browser client library `channels.js`, and the chart library (uPlot,
//! vendored from npm with its licence, see `web/vendor/uplot/README.md`).
//! They are compiled into the binary, so `bridge serve` needs no files
//! beside it and no CDN.
//!
//! The page gets a Content-Security-Policy: scripts and styles only from the
//! bridge itself (no inline script, so injected markup cannot run),
//! WebSockets to any bridge (the page can watch another deployment),
//! no framing (its buttons send commands to devices), no form posts, and no
//! Referer (a token may be in its URL).

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// One file: its path, content type and bytes.
struct Asset {
    path: &'static str,
    kind: &'static str,
    body: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        kind: HTML,
        body: include_str!("../../../web/index.html"),
    },
    Asset {
        path: "/channels.js",
        kind: JS,
        body: include_str!("../../../web/channels.js"),
    },
    Asset {
        path: "/dashboard.js",
        kind: JS,
        body: include_str!("../../../web/dashboard.js"),
    },
    Asset {
        path: "/dashboard.css",
        kind: CSS,
        body: include_str!("../../../web/dashboard.css"),
    },
    Asset {
        path: "/vendor/uplot.min.js",
        kind: JS,
        body: include_str!("../../../web/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        path: "/vendor/uplot.min.css",
        kind: CSS,
        body: include_str!("../../../web/vendor/uplot/uPlot.min.css"),
    },
    Asset {
        path: "/vendor/uplot.LICENSE",
        kind: TEXT,
        body: include_str!("../../../web/vendor/uplot/LICENSE"),
    },
];

/// The page's Content-Security-Policy.
pub const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

/// Routes for every file (for any router state).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        let (kind, body) = (asset.kind, asset.body);
        router.route(
            asset.path,
            get(move || async move {
                let mut response = (
                    [
                        (header::CONTENT_TYPE, kind),
                        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    body,
                )
                    .into_response();
                if kind == HTML {
                    let headers = response.headers_mut();
                    headers.insert(
                        header::CONTENT_SECURITY_POLICY,
                        header::HeaderValue::from_static(PAGE_POLICY),
                    );
                    headers.insert(
                        header::REFERRER_POLICY,
                        header::HeaderValue::from_static("no-referrer"),
                    );
                    headers.insert(
                        header::X_FRAME_OPTIONS,
                        header::HeaderValue::from_static("DENY"),
                    );
                }
                response
            }),
        )
    })
}
