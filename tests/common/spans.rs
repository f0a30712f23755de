//! Spans the tests read (feature `opentelemetry`): the SDK installed as the global tracer
//! provider once per test binary, exporting into memory as each span ends.

use std::sync::{Arc, Mutex, OnceLock};

use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

/// Spans the SDK ended.
#[derive(Debug, Clone, Default)]
pub struct Collected(pub Arc<Mutex<Vec<SpanData>>>);

impl Collected {
    /// The spans ended so far.
    pub fn spans(&self) -> Vec<SpanData> {
        self.0.lock().unwrap().clone()
    }
}

impl SpanExporter for Collected {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

/// The global tracer provider, installed at the first call, and what it collects.
pub fn installed() -> (Collected, SdkTracerProvider) {
    static INSTALLED: OnceLock<(Collected, SdkTracerProvider)> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let collected = Collected::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(collected.clone())
                .build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            (collected, provider)
        })
        .clone()
}
