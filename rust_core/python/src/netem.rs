//! Bindings for the link emulator: `LinkEmulator` takes the link's figures as numbers (the Python side reads the
//! TOML profile) and runs the relay on the shared runtime.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::counters_dict;
use super::errors::IntoPyResult;
use super::transport::parse_addr;
use aiflow_net::netem::{Direction, Emulator, LinkParams};

/// The link emulator; see `aiflow_cli.netem.LinkEmulator`.
#[pyclass(module = "aiflow_cli._core", name = "LinkEmulator")]
struct PyEmulator {
    emu: Option<Emulator>,
    address: String,
}

#[pymethods]
impl PyEmulator {
    /// Rates in Mbit/s, times in ms, loss in percent; delay is one-way (rtt_ms / 2 per direction).
    #[new]
    #[pyo3(signature = (listen, forward, uplink_mbps, downlink_mbps, rtt_ms, jitter_ms = 0.0, loss_pct = 0.0, queue_ms = 100.0, max_datagram_bytes = 1472, seed = 0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        listen: &str,
        forward: &str,
        uplink_mbps: f64,
        downlink_mbps: f64,
        rtt_ms: f64,
        jitter_ms: f64,
        loss_pct: f64,
        queue_ms: f64,
        max_datagram_bytes: usize,
        seed: u64,
    ) -> PyResult<PyEmulator> {
        let dir = |rate_mbps| Direction { rate_mbps, delay_ms: rtt_ms / 2.0, jitter_ms, loss_pct, queue_ms };
        let params = LinkParams { uplink: dir(uplink_mbps), downlink: dir(downlink_mbps), max_datagram_bytes, seed };
        let emu = Emulator::start(parse_addr(listen).py()?, parse_addr(forward).py()?, params).py()?;
        let address = emu.local_addr().to_string();
        Ok(PyEmulator { emu: Some(emu), address })
    }

    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// {"uplink": {...}, "downlink": {...}, "flows": n}: datagrams and bytes in/out, lost, queue drops, too big.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let Some(e) = self.emu.as_ref() {
            let (up, down) = e.stats();
            d.set_item("uplink", counters_dict(py, up.fields())?)?;
            d.set_item("downlink", counters_dict(py, down.fields())?)?;
            d.set_item("flows", e.flows())?;
        }
        Ok(d)
    }

    fn close(&mut self, py: Python<'_>) {
        if let Some(mut e) = self.emu.take() {
            py.detach(move || e.close());
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEmulator>()?;
    Ok(())
}
