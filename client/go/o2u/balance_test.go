package o2u

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
)

// replica counts the GetScoringJob calls it answers.
type replica struct {
	o2uv1.UnimplementedScoringServiceServer
	mu    sync.Mutex
	calls int
}

func (r *replica) GetScoringJob(_ context.Context, req *o2uv1.GetScoringJobRequest) (*o2uv1.GetScoringJobResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	return &o2uv1.GetScoringJobResponse{Job: &o2uv1.ScoringJob{JobId: req.GetJobId()}}, nil
}

// A name that resolves to three replicas (as dns:/// does for the chart's headless Service) gets
// its calls spread over all three, not pinned to the first.
func TestCallsAreBalancedOverEveryResolvedAddress(t *testing.T) {
	replicas := []*replica{{}, {}, {}}
	addresses := make([]resolver.Address, 0, len(replicas))
	for _, r := range replicas {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := grpc.NewServer(grpc.CustomCodec(protoCodec{}))
		o2uv1.RegisterScoringServiceServer(srv, r)
		go func() { _ = srv.Serve(lis) }()
		t.Cleanup(srv.Stop)
		addresses = append(addresses, resolver.Address{Addr: lis.Addr().String()})
	}
	names := manual.NewBuilderWithScheme("o2ureplicas")
	names.InitialState(resolver.State{Addresses: addresses})
	client, err := Dial("o2ureplicas:///o2u-headless", WithDialOptions(grpc.WithResolvers(names)), WithCallTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	// round_robin spreads calls over the subchannels that are ready; the three connect in parallel,
	// so the first calls may all reach the first one up. Pinned (pick_first) would never spread.
	answered := func() bool {
		for _, r := range replicas {
			r.mu.Lock()
			calls := r.calls
			r.mu.Unlock()
			if calls == 0 {
				return false
			}
		}
		return true
	}
	deadline := time.Now().Add(5 * time.Second)
	for !answered() && time.Now().Before(deadline) {
		if _, err := client.Get(context.Background(), "job-00000000000000000000000000000001"); err != nil {
			t.Fatal(err)
		}
	}
	if !answered() {
		t.Fatalf("calls were not spread over every replica: %d, %d, %d", replicas[0].calls, replicas[1].calls, replicas[2].calls)
	}
}
