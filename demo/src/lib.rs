//! The CNNF storefront demo as a library: the shop's layout
//! ([`storefront`]), its namespaces ([`lab`]), what runs inside them
//! ([`traffic`]) and the story told against a running CNNF ([`scenario`]).
//! The `cnnf-demo` binary and the end-to-end test drive it.

pub mod lab;
pub mod scenario;
pub mod storefront;
pub mod traffic;
