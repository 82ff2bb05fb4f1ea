//! Integration tests on a real local control plane (scripts/local-cluster.sh) and, for the
//! operator, the acs-emulator. One test binary, so the control plane starts once per run.

mod chart;
mod circuit;
mod connections;
mod controlplane;
mod hostile;
mod leader;
mod node;
mod operations;
mod operator;
mod restarts;
mod support;
mod tokens;
