pub mod auth;
pub mod policy;
pub mod records;
pub mod runtime;
pub mod service;
pub mod state;
pub mod store;
