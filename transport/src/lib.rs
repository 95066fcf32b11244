//! Dialing backends as a serversTransport says.
