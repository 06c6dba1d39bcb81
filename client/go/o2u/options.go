package o2u

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// Option configures Dial.
type Option func(*options) error

// RetryPolicy bounds the retries of Submit (safe because of the request id; see Submit), of
// the calls that are safe to repeat after UNAVAILABLE (Get, Cancel, Summary, Export, and each
// page of ListJobs and ScoresAll), and the reconnects of Watch. The delay doubles from
// InitialBackoff up to MaxBackoff, with jitter; a server's RetryInfo delay is used when it is
// longer.
type RetryPolicy struct {
	// MaxRetries is the number of retries after the first attempt; for Watch it counts
	// consecutive failed reconnects (a received event resets it). 0 disables retries.
	MaxRetries     int
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
}

// DefaultRetryPolicy is used unless WithRetryPolicy says otherwise: about 30 s of retries.
var DefaultRetryPolicy = RetryPolicy{MaxRetries: 8, InitialBackoff: 250 * time.Millisecond, MaxBackoff: 8 * time.Second}

// DefaultCallTimeout bounds each unary call whose context has no deadline.
const DefaultCallTimeout = 30 * time.Second

// DefaultKeepalive pings the server every 30 s while calls are in flight and closes the
// connection when a ping goes unanswered for 20 s, so a watch whose server vanished without a
// TCP reset (a crashed host, a middlebox that dropped the flow) fails UNAVAILABLE and reconnects
// instead of waiting forever. The server accepts a client's pings every 20 s and closes
// connections that ping more often (GOAWAY too_many_pings).
var DefaultKeepalive = keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 20 * time.Second}

type options struct {
	tls            bool
	caFile         string
	certFile       string
	keyFile        string
	serverName     string
	tlsConfig      *tls.Config
	token          func() (string, error)
	plaintextToken bool
	callTimeout    time.Duration
	retry          RetryPolicy
	keepalive      keepalive.ClientParameters
	userAgent      string
	dialOptions    []grpc.DialOption
}

// WithTLS encrypts the connection and verifies the server against the PEM CA bundle in
// caFile, or against the system roots when caFile is "".
func WithTLS(caFile string) Option {
	return func(o *options) error {
		o.tls, o.caFile = true, caFile
		return nil
	}
}

// WithClientCertificate presents a client certificate (mutual TLS); it implies TLS.
func WithClientCertificate(certFile, keyFile string) Option {
	return func(o *options) error {
		if certFile == "" || keyFile == "" {
			return errors.New("o2u: a client certificate needs both a certificate and a key file")
		}
		o.tls, o.certFile, o.keyFile = true, certFile, keyFile
		return nil
	}
}

// WithServerName overrides the name the server certificate is verified against; without TLS
// Dial refuses it.
func WithServerName(name string) Option {
	return func(o *options) error {
		o.serverName = name
		return nil
	}
}

// WithTLSConfig uses a ready TLS configuration; it overrides WithTLS, WithClientCertificate
// and WithServerName.
func WithTLSConfig(cfg *tls.Config) Option {
	return func(o *options) error {
		o.tls, o.tlsConfig = true, cfg.Clone()
		return nil
	}
}

// WithBearerToken sends "authorization: Bearer <token>" with every call.
func WithBearerToken(token string) Option {
	return func(o *options) error {
		token = strings.TrimSpace(token)
		if token == "" {
			return errors.New("o2u: empty bearer token")
		}
		o.token = func() (string, error) { return token, nil }
		return nil
	}
}

// WithTokenFile sends the token held in path as a bearer token. The file is read for every
// call, so a rotated secret (e.g. a Kubernetes Secret volume) takes effect without a redial.
func WithTokenFile(path string) Option {
	return func(o *options) error {
		read := func() (string, error) {
			data, err := os.ReadFile(path)
			if err != nil {
				return "", fmt.Errorf("o2u: reading token file: %w", err)
			}
			token := strings.TrimSpace(string(data))
			if token == "" {
				return "", fmt.Errorf("o2u: token file %s is empty", path)
			}
			return token, nil
		}
		if _, err := read(); err != nil {
			return err
		}
		o.token = read
		return nil
	}
}

// WithPlaintextToken allows sending a bearer token over an unencrypted connection. Only for
// loopback or a network that is already encrypted (e.g. a service mesh); without it a token
// requires TLS.
func WithPlaintextToken() Option {
	return func(o *options) error {
		o.plaintextToken = true
		return nil
	}
}

// WithCallTimeout bounds each unary call whose context has no deadline (default
// DefaultCallTimeout; 0 leaves such calls unbounded). Watch streams are bounded only by their
// context, since a job can train for hours.
func WithCallTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d < 0 {
			return errors.New("o2u: negative call timeout")
		}
		o.callTimeout = d
		return nil
	}
}

// WithRetryPolicy replaces DefaultRetryPolicy.
func WithRetryPolicy(p RetryPolicy) Option {
	return func(o *options) error {
		if p.MaxRetries < 0 || p.InitialBackoff < 0 || p.MaxBackoff < p.InitialBackoff {
			return fmt.Errorf("o2u: invalid retry policy %+v", p)
		}
		o.retry = p
		return nil
	}
}

// WithKeepalive replaces DefaultKeepalive: a ping every interval while calls are in flight (grpc-go
// waits at least 10 s), and the connection closed when one goes unanswered for timeout. An
// interval of 0 turns keepalive pings off.
func WithKeepalive(interval, timeout time.Duration) Option {
	return func(o *options) error {
		if interval < 0 || timeout < 0 || (interval > 0 && timeout == 0) {
			return fmt.Errorf("o2u: invalid keepalive interval %v and timeout %v", interval, timeout)
		}
		o.keepalive = keepalive.ClientParameters{Time: interval, Timeout: timeout}
		return nil
	}
}

// WithUserAgent prefixes the gRPC user agent.
func WithUserAgent(ua string) Option {
	return func(o *options) error {
		o.userAgent = ua
		return nil
	}
}

// WithDialOptions passes extra grpc.DialOptions (interceptors, ...) to grpc.Dial, after the
// client's own, so they override them.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) error {
		o.dialOptions = append(o.dialOptions, opts...)
		return nil
	}
}

func (o *options) transportCredentials() (credentials.TransportCredentials, error) {
	if !o.tls {
		return nil, nil
	}
	if o.tlsConfig != nil {
		return credentials.NewTLS(o.tlsConfig), nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: o.serverName}
	if o.caFile != "" {
		pem, err := os.ReadFile(o.caFile)
		if err != nil {
			return nil, fmt.Errorf("o2u: reading CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("o2u: no PEM certificate in CA file %s", o.caFile)
		}
		cfg.RootCAs = pool
	}
	if o.certFile != "" {
		cert, err := tls.LoadX509KeyPair(o.certFile, o.keyFile)
		if err != nil {
			return nil, fmt.Errorf("o2u: loading client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return credentials.NewTLS(cfg), nil
}

// bearerToken implements credentials.PerRPCCredentials.
type bearerToken struct {
	token      func() (string, error)
	requireTLS bool
}

func (b bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	token, err := b.token()
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

func (b bearerToken) RequireTransportSecurity() bool { return b.requireTLS }
