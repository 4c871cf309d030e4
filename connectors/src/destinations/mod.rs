pub mod file;
pub mod http;
pub mod hubspot;
pub mod mixpanel;
pub mod postgres;
pub mod segment;
pub mod webhook;
