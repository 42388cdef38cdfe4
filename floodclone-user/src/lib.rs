//! FloodClone: delivers one file or a directory tree from a source to many destinations over
//! an unknown network, pipelining verified chunks over every link in both directions.
//!
//! To embed it: [`send`] and [`recv`] with their options ([`Swarm`], [`SendOptions`],
//! [`RecvOptions`]) start a [`Transfer`], which streams typed [`events::Event`]s, can be
//! stopped with a [`Cancel`] handle, and ends with an outcome (module [`api`], with an
//! example). Everything below is how it works, public for the tests and the tools.
//!
//! Modules follow the data flow of one transfer (README, "How it moves data"):
//! - what is sent: [`manifest`] (the file's chunks and hashes), [`wire`] (the messages);
//! - how nodes talk: [`transport`] (QUIC and the swarm token; [`congestion`], its default
//!   controller), `conn` (one connection:
//!   serving requested chunks, receiving chunk streams);
//! - the two roles over them: [`source`] and [`destination`], each a struct with one handler
//!   per event, run by the one event loop in [`node`];
//! - who is behind which link: [`discovery`] (kernel route lookups), [`trace`] (the whole
//!   path to a member, where routes differ by direction), [`claims`] (a member's addresses,
//!   believed once proven);
//! - what to ask of whom: the scheduler in the `floodclone-sched` crate;
//! - chunks on disk, resumable: [`storage`]; a directory tree as one stream of chunks:
//!   [`tree`] (its entries and their checks);
//! - measurements in the kernel: [`linkstats`] (the eBPF programs' maps), [`meter`] (rates
//!   from counters), [`stats`] (`floodclone stats`);
//! - what a person or a script sees: [`events`] (the `--json` events), [`output`],
//!   [`progress`]; what they type: [`hosts`] (destinations by address or name); systemd's
//!   readiness: [`sd_notify`];
//! - the async runtime's idle workers at high packet rates: [`park`].

pub mod api;
pub mod claims;
pub mod congestion;
pub(crate) mod conn;
pub mod destination;
pub mod discovery;
pub mod hosts;
pub mod linkstats;
pub mod manifest;
pub mod meter;
pub mod metrics;
pub mod node;
pub mod output;
pub mod park;
pub mod progress;
pub mod sd_notify;
pub mod source;
pub mod stats;
pub mod storage;
pub mod trace;
pub mod transport;
pub mod tree;
pub mod upload_cap;
pub mod wire;

/// The `--json` events (the `floodclone-events` crate).
pub use floodclone_events as events;

pub use api::{
    recv, send, Cancel, Error, OutputMode, RecvOptions, RecvOutcome, SendOptions, Swarm, Transfer,
};
#[doc(hidden)]
pub use conn::Misbehaviour;
pub use source::SendOutcome;
