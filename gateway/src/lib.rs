//! tagway: a TCP service-mesh gateway for Consul and Nomad.
