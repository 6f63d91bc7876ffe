//! The order/cart example services, the end-to-end and fault tests and the
//! benchmark driver.
