//! The delivery-rate congestion controller ("rate") behind quinn's `Controller` trait. The model itself, and why
//! it is built so, is I/O-free in [`aiflow_proto::congestion`].

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use aiflow_proto::congestion::RateModel;
use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Builds [`RateController`]s (`TransportConfig::congestion_controller_factory`).
#[derive(Debug, Clone)]
pub struct RateConfig {
    /// Window before the first measurement (bytes); RFC 9002's 14720 by default.
    pub initial_window: u64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig { initial_window: 14_720 }
    }
}

impl ControllerFactory for RateConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(RateController { model: RateModel::new(self.initial_window, current_mtu) })
    }
}

/// [`RateModel`] behind quinn's `Controller` trait.
#[derive(Debug, Clone)]
pub struct RateController {
    model: RateModel,
}

impl Controller for RateController {
    fn on_sent(&mut self, now: Instant, _bytes: u64, _last_packet_number: u64) {
        self.model.on_sent(now);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.model.on_ack(now, sent, bytes, app_limited, rtt.min());
    }

    fn on_end_acks(&mut self, now: Instant, _in_flight: u64, _app_limited: bool, _largest_packet_num_acked: Option<u64>) {
        self.model.on_end_acks(now);
    }

    fn on_congestion_event(&mut self, _now: Instant, _sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.model.on_loss(lost_bytes, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.model.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.model.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.model.window();
        m.pacing_rate = Some(self.model.bandwidth() * 8);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.model.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
