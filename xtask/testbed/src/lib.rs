//! FloodClone's emulated testbed, shared by `cargo xtask` and the end-to-end tests:
//! topology files ([`topology`]), their routes ([`routing`], also the simulator's), the
//! network of namespaces, veth links and HTB shaping ([`netns`]), delay, jitter and loss
//! made in userspace ([`delayline`]), the max-flow floor
//! ([`bound`]), one real transfer on it ([`run`]) with its picture ([`picture`]), test
//! traffic ([`traffic`]), and what it takes to get there: the tools ([`setup`]) and the
//! `floodclone` binary ([`build`]), and its Debian package ([`dist`]).

pub mod bound;
pub mod build;
pub mod delayline;
pub mod dist;
pub mod idle;
pub mod netns;
pub mod picture;
pub mod random;
pub mod routing;
pub mod run;
pub mod setup;
pub mod topology;
pub mod traffic;

pub use netns::Testbed;
pub use topology::Topology;
