pub mod auth;
pub mod service;
pub mod state;
pub mod store;
