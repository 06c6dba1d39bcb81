package o2u

import (
	"context"
	"errors"
	"io"
	"math/rand"
	"time"

	"google.golang.org/grpc/codes"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
)

// ErrWatchRetriesExhausted is matched (errors.Is) by the error Watch returns when it gave up
// reconnecting; the last connection error stays reachable with AsError or errors.As.
var ErrWatchRetriesExhausted = errors.New("o2u: watch retries exhausted")

type retriesExhausted struct{ last error }

func (r retriesExhausted) Error() string {
	return ErrWatchRetriesExhausted.Error() + ": " + r.last.Error()
}
func (r retriesExhausted) Unwrap() error        { return r.last }
func (r retriesExhausted) Is(target error) bool { return target == ErrWatchRetriesExhausted }

// Watch streams the events of a job with a sequence greater than afterSequence to fn, in
// order and each once, and returns the last event delivered (nil if none) once an event moves
// the job to a final state, or once a stream that delivered nothing ended because the job was
// already final (afterSequence at or past its final event). When the stream breaks (server
// restart, network fault, a stream that ended early) Watch reconnects from the last sequence it
// delivered, within the retry policy; the counter resets whenever an event arrives. fn returning ErrStop ends Watch
// without an error, any other error from fn ends it with that error. Cancelling ctx ends the
// watch, never the job.
func (c *Client) Watch(ctx context.Context, jobID string, afterSequence int64, fn func(*o2uv1.JobEvent) error) (*o2uv1.JobEvent, error) {
	var last *o2uv1.JobEvent
	b := newBackoff(c.opts.retry)
	for {
		delivered, done, err := c.watchOnce(ctx, jobID, &afterSequence, &last, fn)
		if done || (err != nil && !watchRetryable(err)) {
			return last, err
		}
		if ctx.Err() != nil {
			return last, ctx.Err()
		}
		if delivered {
			b.reset()
		}
		if err == nil && !delivered {
			// Nothing after afterSequence: the job is final and its last event already seen, or
			// the server is draining. Only the job's state tells which.
			job, getErr := c.Get(ctx, jobID)
			if getErr == nil && Finished(job.GetState()) {
				return last, nil
			}
			if getErr != nil && !watchRetryable(getErr) {
				return last, getErr
			}
		}
		if err == nil {
			// The stream ended without a final event (e.g. the server is draining): resume.
			err = &Error{Code: codes.Unavailable, Message: "watch stream ended before the job finished"}
		}
		if !b.wait(ctx, err) {
			if ctx.Err() != nil {
				return last, ctx.Err()
			}
			return last, retriesExhausted{last: err}
		}
	}
}

// watchOnce runs one stream. done is true when Watch must return (final event, fn error or
// stop); delivered is true when at least one event reached fn.
func (c *Client) watchOnce(ctx context.Context, jobID string, after *int64, last **o2uv1.JobEvent, fn func(*o2uv1.JobEvent) error) (delivered, done bool, err error) {
	streamCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.rpc.WatchScoringJob(streamCtx, &o2uv1.WatchScoringJobRequest{JobId: jobID, AfterSequence: *after}, c.callOpts...)
	if err != nil {
		return false, false, wrapError(ctx, err)
	}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return delivered, false, nil
		}
		if err != nil {
			return delivered, false, wrapError(ctx, err)
		}
		event := resp.GetEvent()
		// A replay after a reconnect may overlap what was delivered: skip it.
		if event == nil || event.GetSequence() <= *after {
			continue
		}
		*after = event.GetSequence()
		*last = event
		delivered = true
		if err := fn(event); err != nil {
			return delivered, true, stopIsNil(err)
		}
		if event.GetType() == o2uv1.JobEventType_JOB_EVENT_TYPE_STATE_CHANGED && Finished(event.GetState()) {
			return delivered, true, nil
		}
	}
}

// watchRetryable: transport faults and server-side limits are worth a reconnect; a missing
// job, a bad request or missing credentials are not.
func watchRetryable(err error) bool {
	switch Code(err) {
	case codes.Unavailable, codes.Internal, codes.Aborted, codes.ResourceExhausted, codes.Unknown:
		return true
	case codes.DeadlineExceeded:
		// The server (or a proxy) cut a long stream; the caller's own deadline is reported
		// as context.DeadlineExceeded by wrapError and ends Watch before this check.
		return true
	default:
		return false
	}
}

// WatchEvents is Watch delivering to a channel: events arrive on the first channel, which is
// closed when the watch ends; the second then receives Watch's result (nil on a final event)
// and is closed. The caller must drain events or cancel ctx.
func (c *Client) WatchEvents(ctx context.Context, jobID string, afterSequence int64) (<-chan *o2uv1.JobEvent, <-chan error) {
	events := make(chan *o2uv1.JobEvent)
	result := make(chan error, 1)
	go func() {
		defer close(result)
		_, err := c.Watch(ctx, jobID, afterSequence, func(e *o2uv1.JobEvent) error {
			select {
			case events <- e:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
		close(events)
		result <- err
	}()
	return events, result
}

// backoff is exponential with jitter (each delay is drawn from [d/2, d], so many clients
// reconnecting after one server restart spread out), bounded by the policy, and never shorter than a
// RetryInfo delay the server asked for.
type backoff struct {
	policy  RetryPolicy
	retries int
	next    time.Duration
}

func newBackoff(p RetryPolicy) *backoff {
	return &backoff{policy: p, next: p.InitialBackoff}
}

func (b *backoff) reset() {
	b.retries = 0
	b.next = b.policy.InitialBackoff
}

// wait sleeps before the next attempt; false when the retries are spent or ctx is done.
func (b *backoff) wait(ctx context.Context, cause error) bool {
	if b.retries >= b.policy.MaxRetries {
		return false
	}
	b.retries++
	delay := b.next / 2
	if half := int64(b.next - delay); half > 0 {
		delay += time.Duration(rand.Int63n(half + 1))
	}
	if e, ok := AsError(cause); ok && e.RetryDelay > delay {
		delay = e.RetryDelay
	}
	b.next *= 2
	if b.next > b.policy.MaxBackoff {
		b.next = b.policy.MaxBackoff
	}
	return sleep(ctx, delay)
}
