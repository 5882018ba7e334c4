//! The admin server every long-running cloak process serves (the operator, `cloak agent`,
//! `cloak node`, `cloak portfwd`): one shape, so a probe, a scrape or an operator's curl reads
//! them all the same way.
//!
//! - `/livez`: 200 while the process serves at all.
//! - `/readyz`: 200 with the process's own word on what it waits for, or 503 with the reason.
//! - `/metrics`: the process's registry in OpenMetrics text ([`encode`]), with its content type
//!   (Prometheus picks its parser by it); or 401 when the process asks for a token the scrape
//!   did not give.
//!
//! A process adds its own routes (the agent's `/status`) with [`Admin::route`].

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use axum::{
    Router,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::{MethodRouter, get},
};
use prometheus_client::registry::Registry;

/// OpenMetrics 1.0, what `prometheus_client`'s text encoder writes.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the process is ready, and in words why (not).
pub type Readiness = Result<String, String>;

type ReadyFn = dyn Fn(&HeaderMap) -> Readiness + Send + Sync;
type AllowFn = dyn Fn(&HeaderMap) -> bool + Send + Sync;
type ScrapeFn = dyn Fn(&HeaderMap) -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync;

/// One process's admin server, built up and then [served](Admin::serve).
pub struct Admin {
    scrape: Arc<ScrapeFn>,
    /// One scrape at a time: a scrape that clears and refills a family must not encode while
    /// another is half through (two Prometheus servers of an HA pair scrape at once).
    scraping: Arc<tokio::sync::Mutex<()>>,
    ready: Arc<ReadyFn>,
    allow_metrics: Arc<AllowFn>,
    routes: Router,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// Serves what `scrape` encodes at each scrape (gauges computed from state are set first,
    /// then the registry is [encoded](encode)); ready until [`Admin::ready`] says otherwise.
    pub fn new(scrape: impl Fn() -> String + Send + Sync + 'static) -> Self {
        let scrape = Arc::new(scrape);
        Self::new_async(move |_| {
            let scrape = Arc::clone(&scrape);
            async move { scrape() }
        })
    }

    /// [`Admin::new`] for a scrape that waits on something first (a blocking read on its own
    /// thread), or that answers by who asks (the request's headers).
    pub fn new_async<F>(scrape: impl Fn(&HeaderMap) -> F + Send + Sync + 'static) -> Self
    where
        F: Future<Output = String> + Send + 'static,
    {
        Self {
            scrape: Arc::new(move |headers| Box::pin(scrape(headers))),
            scraping: Arc::default(),
            ready: Arc::new(|_| Ok("ok".to_owned())),
            allow_metrics: Arc::new(|_| true),
            routes: Router::new(),
        }
    }

    /// What `/readyz` answers (given the request's headers: a caller with a token may be told
    /// more).
    #[must_use]
    pub fn ready(
        mut self,
        ready: impl Fn(&HeaderMap) -> Readiness + Send + Sync + 'static,
    ) -> Self {
        self.ready = Arc::new(ready);
        self
    }

    /// Who may scrape `/metrics` (default: anyone); the others get 401.
    #[must_use]
    pub fn metrics_allowed(
        mut self,
        allow: impl Fn(&HeaderMap) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.allow_metrics = Arc::new(allow);
        self
    }

    /// One more route of the process's own.
    #[must_use]
    pub fn route(mut self, path: &str, method: MethodRouter) -> Self {
        self.routes = self.routes.route(path, method);
        self
    }

    /// The routes, for a caller that serves them itself (or a test).
    pub fn router(self) -> Router {
        let Self {
            scrape,
            scraping,
            ready,
            allow_metrics,
            routes,
        } = self;
        routes
            .route("/livez", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move |headers: HeaderMap| async move {
                    match ready(&headers) {
                        Ok(line) => (StatusCode::OK, format!("{line}\n")),
                        Err(line) => (StatusCode::SERVICE_UNAVAILABLE, format!("{line}\n")),
                    }
                }),
            )
            .route(
                "/metrics",
                get(move |headers: HeaderMap| async move {
                    if !allow_metrics(&headers) {
                        return (StatusCode::UNAUTHORIZED, "this needs a token\n").into_response();
                    }
                    let _one = scraping.lock().await;
                    let body = scrape(&headers).await;
                    ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
                }),
            )
    }

    /// Serves on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// Binds `addr` and serves it.
    pub async fn bind_and_serve(self, addr: SocketAddr) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        self.serve(listener).await
    }

    /// Binds `addr` now (a port taken is the caller's error at start) and serves it in a task
    /// that logs why it stopped.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Ok(tokio::spawn(async move {
            if let Err(e) = self.serve(listener).await {
                tracing::error!(error = %e, %addr, "the admin server stopped");
            }
        }))
    }
}

/// A registry in OpenMetrics text. Encoding into a `String` fails only on a metric's own
/// formatting error, which leaves the text up to it (and is logged).
pub fn encode(registry: &Registry) -> String {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::error!(error = %e, "encoding the metrics");
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    async fn get(admin: Admin, path: &str, auth: Option<&str>) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(admin.serve(listener));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        server.abort();
        let status = answer[9..12].parse().unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_owned();
        (status, content_type, body.to_owned())
    }

    fn registry() -> (Arc<Registry>, Counter) {
        let mut registry = Registry::with_prefix("cloak_test");
        let counter = Counter::default();
        registry.register("things", "Things", counter.clone());
        (Arc::new(registry), counter)
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_refreshed_before_each_scrape() {
        let (registry, counter) = registry();
        let admin = Admin::new(move || {
            counter.inc();
            encode(&registry)
        });
        let (status, content_type, body) = get(admin, "/metrics", None).await;
        assert_eq!(status, 200);
        assert_eq!(content_type, OPENMETRICS);
        assert!(body.contains("cloak_test_things_total 1\n"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn readyz_says_why_not_and_livez_answers_anyway() {
        let (registry, _) = registry();
        let scrape = move || encode(&registry);
        let not_ready = || Admin::new(scrape.clone()).ready(|_| Err("no plan yet".into()));
        assert_eq!(get(not_ready(), "/readyz", None).await.0, 503);
        assert_eq!(get(not_ready(), "/readyz", None).await.2, "no plan yet\n");
        assert_eq!(get(not_ready(), "/livez", None).await.0, 200);
        let ready = Admin::new(scrape).ready(|_| Ok("plan applied".into()));
        let (status, _, body) = get(ready, "/readyz", None).await;
        assert_eq!((status, body.as_str()), (200, "plan applied\n"));
    }

    #[tokio::test]
    async fn metrics_can_ask_for_a_token_and_a_process_adds_its_own_routes() {
        let (registry, _) = registry();
        let admin = || {
            let registry = Arc::clone(&registry);
            Admin::new(move || encode(&registry))
                .metrics_allowed(|h| {
                    h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some("Bearer t")
                })
                .route("/status", axum::routing::get(|| async { "mine" }))
        };
        assert_eq!(get(admin(), "/metrics", None).await.0, 401);
        assert_eq!(get(admin(), "/metrics", Some("wrong")).await.0, 401);
        assert_eq!(get(admin(), "/metrics", Some("t")).await.0, 200);
        assert_eq!(get(admin(), "/status", None).await.2, "mine");
    }
}
