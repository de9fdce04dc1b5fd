//! The test world of mailpoll: a throwaway Postgres, validation of custom resources as an API
//! server does it, and (in later modules) the emulators of Microsoft Graph and the Kubernetes
//! API. Never linked into the shipped binary.

pub mod admission;
pub mod bench;
pub mod cluster;
pub mod crd_validation;
pub mod credentials;
pub mod directory;
pub mod graph;
pub mod kube;
pub mod pg;
pub mod pgbouncer;
pub mod sandbox;
pub mod wait;
pub mod webhook_receiver;

pub use wait::{Patience, TimedOut, try_wait_for, wait_for, wait_for_ok, wait_until};
