-- The W3C trace context of the write an op came from: published in the op's
-- NATS headers, so one trace spans the client's write and every edge's apply.
ALTER TABLE intents ADD COLUMN traceparent TEXT;
ALTER TABLE ops ADD COLUMN traceparent TEXT;
