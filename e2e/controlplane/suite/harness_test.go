package suite

// The harness: cluster clients, the operator as a local process, polling, golden subset
// comparison and the step timer. The steps themselves are in e2e_test.go.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"
)

// ddGVR is the DisaggDeployment resource.
var ddGVR = schema.GroupVersionResource{Group: "tandem.dev", Version: "v1alpha1", Resource: "disaggdeployments"}

// childKinds maps every kind the operator creates to its resource, in a stable order.
var childKinds = []struct {
	Kind string
	GVR  schema.GroupVersionResource
}{
	{"ServiceAccount", schema.GroupVersionResource{Version: "v1", Resource: "serviceaccounts"}},
	{"Role", schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "roles"}},
	{"RoleBinding", schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "rolebindings"}},
	{"Service", schema.GroupVersionResource{Version: "v1", Resource: "services"}},
	{"Deployment", schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"}},
	{"StatefulSet", schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "statefulsets"}},
	{"PodDisruptionBudget", schema.GroupVersionResource{Group: "policy", Version: "v1", Resource: "poddisruptionbudgets"}},
}

func gvrOf(kind string) (schema.GroupVersionResource, error) {
	for _, c := range childKinds {
		if c.Kind == kind {
			return c.GVR, nil
		}
	}
	return schema.GroupVersionResource{}, fmt.Errorf("kind %q is not one the operator creates", kind)
}

// env is what every step needs: paths, clients and the operator processes.
type env struct {
	root       string // repository root
	kubectl    string
	helm       string
	kubeconfig string // the admin kubeconfig the suite was given
	nsConfig   string // the same identity with the test namespace as its default
	operator   string // tandem-operator binary
	artifacts  string // logs and kubeconfigs written by the suite
	ns         string // namespace of the example manifests
	opNS       string // namespace of the chart release
	config     *rest.Config
	kube       *kubernetes.Clientset
	dyn        dynamic.Interface
	opConfig   string // kubeconfig authenticated as the chart's ServiceAccount
	saName     string
	procsMu    sync.Mutex
	procs      []*operatorProc // every operator started, killed by stopAll
}

// stopAll kills every operator the suite started (steps are subtests, so their own
// t.Cleanup would end a process that later steps still use).
func (e *env) stopAll() {
	e.procsMu.Lock()
	defer e.procsMu.Unlock()
	for _, p := range e.procs {
		_ = p.stop(syscall.SIGKILL)
	}
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", ".."))
}

func getenv(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}

func newEnv(t *testing.T) *env {
	t.Helper()
	root := repoRoot()
	e := &env{
		root:       root,
		kubectl:    getenv("KUBECTL", filepath.Join(root, ".cache", "bin", "kubectl")),
		helm:       getenv("HELM", filepath.Join(root, ".cache", "bin", "helm")),
		kubeconfig: os.Getenv("KUBECONFIG"),
		operator:   getenv("TANDEM_OPERATOR_BIN", filepath.Join(root, "target", "release", "tandem-operator")),
		artifacts:  getenv("E2E_ARTIFACTS", filepath.Join(root, ".cache", "e2e", "artifacts")),
		ns:         getenv("E2E_NAMESPACE", "tandem-e2e"),
		opNS:       getenv("E2E_OPERATOR_NAMESPACE", "tandem-system"),
	}
	if e.kubeconfig == "" {
		t.Fatal("KUBECONFIG is not set: run `make e2e`, or point it at a cluster (see e2e/README.md)")
	}
	for _, bin := range []string{e.kubectl, e.helm, e.operator} {
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("%s is missing (make kube-tools; cargo build --release -p tandem-operator): %v", bin, err)
		}
	}
	if err := os.MkdirAll(e.artifacts, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", e.kubeconfig)
	if err != nil {
		t.Fatalf("reading KUBECONFIG %s: %v", e.kubeconfig, err)
	}
	cfg.QPS, cfg.Burst = 100, 200
	e.config = cfg
	if e.kube, err = kubernetes.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if e.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	// A copy of the admin kubeconfig whose context defaults to the test namespace, so
	// `kubectl apply -R -f manifests/` puts namespace-less examples there, as a user's would.
	raw, err := clientcmd.LoadFromFile(e.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	if ctx, ok := raw.Contexts[raw.CurrentContext]; ok {
		ctx.Namespace = e.ns
	} else {
		t.Fatalf("KUBECONFIG %s has no current context", e.kubeconfig)
	}
	e.nsConfig = filepath.Join(e.artifacts, "kubeconfig-namespaced")
	if err := clientcmd.WriteToFile(*raw, e.nsConfig); err != nil {
		t.Fatal(err)
	}
	return e
}

// cmd runs a command with the namespaced kubeconfig and returns its combined output.
func (e *env) cmd(name string, args ...string) (string, error) {
	c := exec.Command(name, args...)
	c.Env = append(os.Environ(), "KUBECONFIG="+e.nsConfig)
	c.Dir = e.root
	out, err := c.CombinedOutput()
	return string(out), err
}

func (e *env) must(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := e.cmd(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return out
}

func (e *env) applyYAML(t *testing.T, doc string) {
	t.Helper()
	c := exec.Command(e.kubectl, "apply", "-f", "-")
	c.Env = append(os.Environ(), "KUBECONFIG="+e.nsConfig)
	c.Stdin = strings.NewReader(doc)
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply: %v\n%s\n%s", err, out, doc)
	}
}

// eventually polls check until it reports done, failing the test with check's last
// explanation after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, check func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		done, why := check()
		if done {
			return
		}
		last = why
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %s: %s", what, timeout, last)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// ---- the operator as a local process ----

// operatorProc is one tandem-operator replica running on this machine.
type operatorProc struct {
	holder string
	port   int
	cmd    *exec.Cmd
	log    string
	done   chan struct{}
	err    error
}

const leaseSeconds = 6

// metricsPort is the /metrics port of the suite's n-th operator replica, from
// $E2E_METRICS_PORT_BASE (18081) so that two runs on one machine can be kept apart.
func metricsPort(n int) int {
	base, err := strconv.Atoi(getenv("E2E_METRICS_PORT_BASE", "18081"))
	if err != nil {
		base = 18081
	}
	return base + n
}

func (e *env) startOperator(t *testing.T, holder string, port int) *operatorProc {
	t.Helper()
	logPath := filepath.Join(e.artifacts, "operator-"+holder+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "---- started %s ----\n", time.Now().Format(time.RFC3339))
	c := exec.Command(e.operator,
		"--metrics-port", strconv.Itoa(port),
		"--log-format", "text",
		"--lease-namespace", e.opNS,
		"--lease-holder", holder,
		"--lease-seconds", strconv.Itoa(leaseSeconds),
	)
	// Only the ServiceAccount's kubeconfig: nothing of the admin identity leaks in.
	c.Env = []string{
		"KUBECONFIG=" + e.opConfig,
		"RUST_LOG=" + getenv("E2E_OPERATOR_LOG", "info"),
		"PATH=" + os.Getenv("PATH"),
	}
	// The scale test's knob, passed on when set (make e2e-scale TANDEM_OPERATOR_MAX_...=N).
	if v := os.Getenv("TANDEM_OPERATOR_MAX_CONCURRENT_RECONCILES"); v != "" {
		c.Env = append(c.Env, "TANDEM_OPERATOR_MAX_CONCURRENT_RECONCILES="+v)
	}
	c.Stdout, c.Stderr = f, f
	if err := c.Start(); err != nil {
		t.Fatalf("starting %s: %v", e.operator, err)
	}
	p := &operatorProc{holder: holder, port: port, cmd: c, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = c.Wait()
		f.Close()
		close(p.done)
	}()
	e.procsMu.Lock()
	e.procs = append(e.procs, p)
	e.procsMu.Unlock()
	return p
}

func (p *operatorProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop signals the process and waits up to 20 s for it to exit.
func (p *operatorProc) stop(sig syscall.Signal) error {
	if p.exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("operator %s ignored %v for 20s", p.holder, sig)
	}
}

func (p *operatorProc) get(path string) (int, string, error) {
	client := http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d%s", p.port, path))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// metric sums every sample of a counter or gauge family whose labels contain every match.
func (p *operatorProc) metric(name string, matches ...string) (float64, error) {
	code, body, err := p.get("/metrics")
	if err != nil {
		return 0, err
	}
	if code != 200 {
		return 0, fmt.Errorf("/metrics answered %d", code)
	}
	return sumMetric(body, name, matches...), nil
}

func sumMetric(body, name string, matches ...string) float64 {
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') || !containsAll(rest, matches) {
			continue
		}
		fields := strings.Fields(rest)
		v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

func containsAll(s string, parts []string) bool {
	for _, part := range parts {
		if !strings.Contains(s, part) {
			return false
		}
	}
	return true
}

func (p *operatorProc) tail(n int) string {
	data, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// leaseHolder is the holderIdentity of the operator's Lease ("" when absent or released).
func (e *env) leaseHolder(ctx context.Context) (string, error) {
	l, err := e.kube.CoordinationV1().Leases(e.opNS).Get(ctx, "tandem-operator", metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if l.Spec.HolderIdentity == nil {
		return "", nil
	}
	return *l.Spec.HolderIdentity, nil
}

// writeOperatorKubeconfig asks the TokenRequest API for a token of the chart's
// ServiceAccount and writes a kubeconfig that carries only that token.
func (e *env) writeOperatorKubeconfig(t *testing.T, ctx context.Context) {
	t.Helper()
	exp := int64(3 * 3600)
	tr, err := e.kube.CoreV1().ServiceAccounts(e.opNS).CreateToken(ctx, e.saName,
		&authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s/%s: %v", e.opNS, e.saName, err)
	}
	ca := e.config.CAData
	if len(ca) == 0 && e.config.CAFile != "" {
		if ca, err = os.ReadFile(e.config.CAFile); err != nil {
			t.Fatal(err)
		}
	}
	cluster := fmt.Sprintf("    server: %s\n", e.config.Host)
	if len(ca) > 0 {
		cluster += fmt.Sprintf("    certificate-authority-data: %s\n", base64.StdEncoding.EncodeToString(ca))
	} else if e.config.Insecure {
		cluster += "    insecure-skip-tls-verify: true\n"
	}
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
%susers:
- name: %s
  user:
    token: %s
contexts:
- name: operator
  context: {cluster: e2e, user: %s}
current-context: operator
`, cluster, e.saName, tr.Status.Token, e.saName)
	e.opConfig = filepath.Join(e.artifacts, "kubeconfig-operator")
	if err := os.WriteFile(e.opConfig, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
}

// ---- golden comparison ----

// goldenObjects reads operator/tests/golden/<name>.yaml: the children the operator's build
// step renders for manifests/<name>.yaml, in namespace "default" with a placeholder uid.
func (e *env) goldenObjects(t *testing.T, name string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(e.root, "operator", "tests", "golden", name+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, doc := range strings.Split(string(data), "\n---") {
		doc = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(doc), "---"))
		if doc == "" {
			continue
		}
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			t.Fatalf("golden %s: %v", name, err)
		}
		out = append(out, obj)
	}
	return out
}

const goldenUID = "00000000-0000-4000-8000-000000000001"

// relocate rewrites the golden's namespace and placeholder uid to the live ones.
func relocate(v any, ns, uid string) any {
	switch x := v.(type) {
	case map[string]any:
		for k, val := range x {
			if s, ok := val.(string); ok && k == "namespace" && s == "default" {
				x[k] = ns
			} else if ok && k == "uid" && s == goldenUID {
				x[k] = uid
			} else {
				x[k] = relocate(val, ns, uid)
			}
		}
		return x
	case []any:
		for i := range x {
			x[i] = relocate(x[i], ns, uid)
		}
		return x
	default:
		return v
	}
}

// subsetDiff lists where live differs from want: every field of want must be in live with
// an equal value (the API server adds defaults, which are ignored); lists must have the same
// length and match element by element.
func subsetDiff(path string, want, live any) []string {
	switch w := want.(type) {
	case map[string]any:
		l, ok := live.(map[string]any)
		if !ok {
			return []string{fmt.Sprintf("%s: want an object, live has %T", path, live)}
		}
		var diffs []string
		keys := make([]string, 0, len(w))
		for k := range w {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			lv, ok := l[k]
			if !ok && w[k] == false {
				// Go's API types drop a false bool (omitempty): absent and false are one value.
				continue
			}
			if !ok {
				diffs = append(diffs, fmt.Sprintf("%s.%s: missing live", path, k))
				continue
			}
			diffs = append(diffs, subsetDiff(path+"."+k, w[k], lv)...)
		}
		return diffs
	case []any:
		l, ok := live.([]any)
		if !ok || len(l) != len(w) {
			return []string{fmt.Sprintf("%s: want %d items, live has %v", path, len(w), live)}
		}
		var diffs []string
		for i := range w {
			diffs = append(diffs, subsetDiff(fmt.Sprintf("%s[%d]", path, i), w[i], l[i])...)
		}
		return diffs
	default:
		if !reflect.DeepEqual(normalize(want), normalize(live)) {
			return []string{fmt.Sprintf("%s: want %v, live %v", path, want, live)}
		}
		return nil
	}
}

// normalize makes YAML and JSON numbers comparable (int64 vs float64).
func normalize(v any) any {
	switch x := v.(type) {
	case int:
		return float64(x)
	case int64:
		return float64(x)
	case float64:
		return x
	default:
		return v
	}
}

// ---- children and resourceVersions ----

// childVersions maps "Kind/name" → resourceVersion for every object labelled with one of the
// deployments, plus the DisaggDeployments themselves.
func (e *env) childVersions(ctx context.Context) (map[string]string, error) {
	out := map[string]string{}
	for _, c := range childKinds {
		list, err := e.dyn.Resource(c.GVR).Namespace(e.ns).List(ctx, metav1.ListOptions{LabelSelector: "tandem.dev/deployment"})
		if err != nil {
			return nil, err
		}
		for _, o := range list.Items {
			out[c.Kind+"/"+o.GetName()] = o.GetResourceVersion()
		}
	}
	dds, err := e.dyn.Resource(ddGVR).Namespace(e.ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	for _, o := range dds.Items {
		out["DisaggDeployment/"+o.GetName()] = o.GetResourceVersion()
	}
	return out, nil
}

func diffVersions(before, after map[string]string) []string {
	var diffs []string
	for k, v := range before {
		if a, ok := after[k]; !ok {
			diffs = append(diffs, k+" deleted")
		} else if a != v {
			diffs = append(diffs, fmt.Sprintf("%s resourceVersion %s → %s", k, v, a))
		}
	}
	for k := range after {
		if _, ok := before[k]; !ok {
			diffs = append(diffs, k+" created")
		}
	}
	sort.Strings(diffs)
	return diffs
}

// condition returns status and reason of a DisaggDeployment condition.
func condition(dd *unstructured.Unstructured, typ string) (status, reason, message string, observed int64) {
	conds, _, _ := unstructured.NestedSlice(dd.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == typ {
			status, _ = m["status"].(string)
			reason, _ = m["reason"].(string)
			message, _ = m["message"].(string)
			observed, _ = toInt64(m["observedGeneration"])
			return
		}
	}
	return "", "", "", 0
}

func toInt64(v any) (int64, bool) {
	switch x := v.(type) {
	case int64:
		return x, true
	case float64:
		return int64(x), true
	case int:
		return int64(x), true
	}
	return 0, false
}

// ---- where the time goes ----

type timing struct {
	step string
	took time.Duration
}

var (
	timingsMu sync.Mutex
	timings   []timing
)

// step runs one named part of the suite as a subtest and records how long it took; the
// suite stops at the first failed step because later ones build on it.
func step(t *testing.T, name string, f func(t *testing.T)) {
	t.Helper()
	start := time.Now()
	ok := t.Run(name, f)
	timingsMu.Lock()
	timings = append(timings, timing{name, time.Since(start)})
	timingsMu.Unlock()
	if !ok {
		t.FailNow()
	}
}

func printTimings(w io.Writer) {
	timingsMu.Lock()
	defer timingsMu.Unlock()
	if len(timings) == 0 {
		return
	}
	var total time.Duration
	var b bytes.Buffer
	fmt.Fprintln(&b, "e2e: where the time goes")
	for _, tm := range timings {
		total += tm.took
		fmt.Fprintf(&b, "  %-44s %7.1fs\n", tm.step, tm.took.Seconds())
	}
	fmt.Fprintf(&b, "  %-44s %7.1fs\n", "suite total", total.Seconds())
	_, _ = w.Write(b.Bytes())
}
