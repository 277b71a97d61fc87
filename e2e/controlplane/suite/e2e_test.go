// Package suite is the operator's end-to-end test against a real Kubernetes control plane:
// the chart installed with helm, the operator running as the chart's ServiceAccount, every
// example in manifests/ applied with kubectl, and the behaviour a cluster admin relies on
// checked step by step. KUBECONFIG names the cluster (`make e2e` starts one with kwok).
package suite

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"
)

func TestMain(m *testing.M) {
	code := m.Run()
	printTimings(os.Stderr)
	os.Exit(code)
}

// example is one DisaggDeployment of manifests/.
type example struct {
	file string // manifests/<file>.yaml, also the golden's name
	name string
}

func (e *env) examples(t *testing.T) []example {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(e.root, "manifests", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests/*.yaml: %v", err)
	}
	var out []example
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range strings.Split(string(data), "\n---") {
			var obj struct {
				Kind     string `json:"kind"`
				Metadata struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if obj.Kind == "DisaggDeployment" {
				out = append(out, example{strings.TrimSuffix(filepath.Base(f), ".yaml"), obj.Metadata.Name})
			}
		}
	}
	return out
}

func TestE2E(t *testing.T) {
	e := newEnv(t)
	defer e.stopAll()
	ctx, cancel := context.WithTimeout(context.Background(), 14*time.Minute)
	defer cancel()
	examples := e.examples(t)
	var leader, standby *operatorProc

	step(t, "helm install chart", func(t *testing.T) {
		e.must(t, e.helm, "upgrade", "--install", "tandem", filepath.Join(e.root, "charts", "tandem-operator"),
			"--namespace", e.opNS, "--create-namespace")
		eventually(t, time.Minute, "CRD established", func() (bool, string) {
			out, err := e.cmd(e.kubectl, "get", "crd", "disaggdeployments.tandem.dev",
				"-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}")
			return err == nil && out == "True", out
		})
		deps, err := e.kube.AppsV1().Deployments(e.opNS).List(ctx, metav1.ListOptions{
			LabelSelector: "app.kubernetes.io/instance=tandem"})
		if err != nil || len(deps.Items) != 1 {
			t.Fatalf("the chart's operator Deployment: %v (%d found)", err, len(deps.Items))
		}
		e.saName = deps.Items[0].Spec.Template.Spec.ServiceAccountName
		if e.saName == "" {
			t.Fatal("the chart's Deployment names no ServiceAccount")
		}
	})

	step(t, "operator as the chart's ServiceAccount", func(t *testing.T) {
		e.writeOperatorKubeconfig(t, ctx)
		// The operator's identity really is the ServiceAccount (not the admin), so every
		// permission it uses below comes from the chart's RBAC.
		out := e.must(t, e.kubectl, "--kubeconfig", e.opConfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
		if want := "system:serviceaccount:" + e.opNS + ":" + e.saName; out != want {
			t.Fatalf("operator token authenticates as %q, want %q", out, want)
		}
		leader = e.startOperator(t, "e2e-a", metricsPort(0))
		eventually(t, 30*time.Second, "operator e2e-a leads", func() (bool, string) {
			if leader.exited() {
				t.Fatalf("operator exited: %v\n%s", leader.err, leader.tail(30))
			}
			h, err := e.leaseHolder(ctx)
			return err == nil && h == "e2e-a", fmt.Sprintf("holder %q, %v", h, err)
		})
	})

	step(t, "example prerequisites", func(t *testing.T) {
		// What the examples assume exists: a namespace enforcing the "restricted" Pod
		// Security profile (the operator renders restricted pods), the hf:// token Secret,
		// the models PVC of the pvc:// examples, and the monitoring namespace of the
		// Prometheus scrape ConfigMap.
		e.applyYAML(t, fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %s
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
---
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: Secret
metadata: {name: hf-token, namespace: %[1]s}
stringData: {token: hf_e2e_not_a_real_token}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: tandem-e2e-models}
spec:
  capacity: {storage: 100Gi}
  accessModes: [ReadOnlyMany, ReadWriteOnce]
  storageClassName: ""
  hostPath: {path: /var/lib/tandem-e2e-models}
  claimRef: {namespace: %[1]s, name: models}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: models, namespace: %[1]s}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: tandem-e2e-models
  resources: {requests: {storage: 100Gi}}
`, e.ns))
		eventually(t, time.Minute, "models PVC bound", func() (bool, string) {
			pvc, err := e.kube.CoreV1().PersistentVolumeClaims(e.ns).Get(ctx, "models", metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			return pvc.Status.Phase == corev1.ClaimBound, string(pvc.Status.Phase)
		})
	})

	step(t, "kubectl apply manifests/", func(t *testing.T) {
		e.must(t, e.kubectl, "apply", "-R", "-f", filepath.Join(e.root, "manifests"))
	})

	step(t, "children match the golden specs", func(t *testing.T) {
		for _, ex := range examples {
			dd := e.waitDD(t, ctx, ex.name)
			want := e.goldenObjects(t, ex.file)
			eventually(t, time.Minute, ex.name+" children", func() (bool, string) {
				var diffs []string
				for _, obj := range want {
					obj = relocate(obj, e.ns, string(dd.GetUID())).(map[string]any)
					kind, _ := obj["kind"].(string)
					name, _, _ := unstructured.NestedString(obj, "metadata", "name")
					gvr, err := gvrOf(kind)
					if err != nil {
						t.Fatal(err)
					}
					live, err := e.dyn.Resource(gvr).Namespace(e.ns).Get(ctx, name, metav1.GetOptions{})
					if err != nil {
						diffs = append(diffs, fmt.Sprintf("%s/%s: %v", kind, name, err))
						continue
					}
					for _, d := range subsetDiff(kind+"/"+name, obj, live.Object) {
						diffs = append(diffs, d)
					}
				}
				return len(diffs) == 0, strings.Join(diffs, "\n  ")
			})
		}
	})

	step(t, "pods Ready and status Ready", func(t *testing.T) {
		for _, ex := range examples {
			e.waitReady(t, ctx, ex.name, 3*time.Minute)
		}
	})

	step(t, "scale decode: StatefulSet follows", func(t *testing.T) {
		name := "llama-disagg"
		patch := []byte(`{"spec":{"decode":{"replicas":3}}}`)
		if _, err := e.dyn.Resource(ddGVR).Namespace(e.ns).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, time.Minute, "decode StatefulSet at 3 replicas", func() (bool, string) {
			sts, err := e.kube.AppsV1().StatefulSets(e.ns).Get(ctx, name+"-decode", metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			return sts.Spec.Replicas != nil && *sts.Spec.Replicas == 3, fmt.Sprintf("replicas %v", sts.Spec.Replicas)
		})
		dd := e.waitReady(t, ctx, name, 2*time.Minute)
		ready, _, _ := unstructured.NestedInt64(dd.Object, "status", "decode", "readyReplicas")
		if ready != 3 {
			t.Fatalf("status.decode.readyReplicas = %d after scaling to 3", ready)
		}
	})

	step(t, "deleted children are recreated", func(t *testing.T) {
		e.deleteAndExpectRecreated(t, ctx, leader)
	})

	step(t, "edited managed field is reverted", func(t *testing.T) {
		name := "llama-disagg-router-decode"
		sts, err := e.kube.AppsV1().StatefulSets(e.ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		wantImage := sts.Spec.Template.Spec.Containers[0].Image
		wantGrace := *sts.Spec.Template.Spec.TerminationGracePeriodSeconds
		// A user edits two fields the operator manages with kubectl (another field manager).
		e.must(t, e.kubectl, "patch", "statefulset", name, "--type=json", "-p",
			`[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"example.com/hijacked:1"},`+
				`{"op":"replace","path":"/spec/template/spec/terminationGracePeriodSeconds","value":1}]`)
		eventually(t, time.Minute, "operator restores image and grace period", func() (bool, string) {
			sts, err := e.kube.AppsV1().StatefulSets(e.ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			img := sts.Spec.Template.Spec.Containers[0].Image
			grace := *sts.Spec.Template.Spec.TerminationGracePeriodSeconds
			return img == wantImage && grace == wantGrace, fmt.Sprintf("image %s, grace %d", img, grace)
		})
	})

	step(t, "invalid objects rejected naming the field", func(t *testing.T) {
		e.invalidObjectsRejected(t)
	})

	step(t, "operator restart writes nothing", func(t *testing.T) {
		// Quiesce: every deployment Ready, then the versions of every child and of the
		// DisaggDeployments themselves must survive a restart untouched.
		for _, ex := range examples {
			dd := e.waitReady(t, ctx, ex.name, 2*time.Minute)
			if on, _, _ := unstructured.NestedBool(dd.Object, "spec", "autoscaling", "enabled"); on {
				// The planner's first step must have landed too (it waits on Prometheus, which
				// this cluster does not run: the step ends in ScalingActive=False,
				// PrometheusUnavailable), or the restarted operator would rightly write it.
				eventually(t, time.Minute, ex.name+" planner stepped", func() (bool, string) {
					got, err := e.dyn.Resource(ddGVR).Namespace(e.ns).Get(ctx, ex.name, metav1.GetOptions{})
					if err != nil {
						return false, err.Error()
					}
					status, reason, msg, _ := condition(got, "ScalingActive")
					return status == "False" && reason == "PrometheusUnavailable",
						fmt.Sprintf("ScalingActive=%q (%s: %s)", status, reason, msg)
				})
			}
		}
		before, err := e.childVersions(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := leader.stop(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if leader.err != nil {
			t.Fatalf("operator exited with %v on SIGTERM\n%s", leader.err, leader.tail(20))
		}
		// SIGTERM releases the Lease, so the restarted replica leads at once.
		if h, err := e.leaseHolder(ctx); err != nil || h != "" {
			t.Fatalf("Lease after graceful stop: holder %q (%v), want released", h, err)
		}
		leader = e.startOperator(t, "e2e-a", metricsPort(0))
		eventually(t, time.Minute, "restarted operator reconciled every deployment", func() (bool, string) {
			n, err := leader.metric("tandem_operator_reconcile_total", "")
			return err == nil && n >= float64(len(examples)), fmt.Sprintf("%v reconciles, %v", n, err)
		})
		time.Sleep(3 * time.Second) // events of any write would have re-triggered reconciles by now
		after, err := e.childVersions(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if diffs := diffVersions(before, after); len(diffs) > 0 {
			t.Fatalf("restarted operator wrote to %d objects:\n  %s", len(diffs), strings.Join(diffs, "\n  "))
		}
		if n, _ := leader.metric("tandem_operator_reconcile_errors_total", ""); n != 0 {
			t.Fatalf("%v reconcile errors after restart\n%s", n, leader.tail(20))
		}
	})

	step(t, "two replicas: one leader, takeover", func(t *testing.T) {
		standby = e.startOperator(t, "e2e-b", metricsPort(1))
		eventually(t, 30*time.Second, "standby ready", func() (bool, string) {
			code, body, err := standby.get("/readyz")
			return err == nil && code == 200, fmt.Sprintf("%d %s %v", code, body, err)
		})
		// Two renew periods: the standby must stay a standby and reconcile nothing.
		time.Sleep(2 * leaseSeconds * time.Second / 3 * 2)
		if h, _ := e.leaseHolder(ctx); h != "e2e-a" {
			t.Fatalf("Lease holder %q while e2e-a is alive", h)
		}
		if n, err := standby.metric("tandem_operator_reconcile_total", ""); err != nil || n != 0 {
			t.Fatalf("standby reconciled %v times (%v)", n, err)
		}
		// A crash, not a clean stop: the Lease stays held until it expires.
		killed := time.Now()
		if err := leader.stop(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		eventually(t, 3*leaseSeconds*time.Second, "e2e-b takes the Lease", func() (bool, string) {
			h, err := e.leaseHolder(ctx)
			return err == nil && h == "e2e-b", fmt.Sprintf("holder %q, %v", h, err)
		})
		t.Logf("takeover %.1fs after the leader was killed (lease %ds)", time.Since(killed).Seconds(), leaseSeconds)
		leader, standby = standby, nil
		eventually(t, time.Minute, "new leader reconciles", func() (bool, string) {
			n, err := leader.metric("tandem_operator_reconcile_total", "")
			return err == nil && n >= float64(len(examples)), fmt.Sprintf("%v reconciles, %v", n, err)
		})
		e.deleteAndExpectRecreated(t, ctx, leader)
	})

	step(t, "planner: Prometheus drives prefill replicas", func(t *testing.T) {
		e.plannerDrivesReplicas(t, ctx, leader)
	})

	step(t, "delete: children garbage-collected", func(t *testing.T) {
		for _, ex := range examples {
			if err := e.dyn.Resource(ddGVR).Namespace(e.ns).Delete(ctx, ex.name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		eventually(t, 2*time.Minute, "no children and no pods left", func() (bool, string) {
			versions, err := e.childVersions(ctx)
			if err != nil {
				return false, err.Error()
			}
			pods, err := e.kube.CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{LabelSelector: "tandem.dev/deployment"})
			if err != nil {
				return false, err.Error()
			}
			left := make([]string, 0, len(versions))
			for k := range versions {
				left = append(left, k)
			}
			sort.Strings(left)
			return len(versions) == 0 && len(pods.Items) == 0,
				fmt.Sprintf("%d pods, objects %v", len(pods.Items), left)
		})
		if n, _ := leader.metric("tandem_operator_reconcile_errors_total", ""); n != 0 {
			t.Errorf("%v reconcile errors during the run\n%s", n, leader.tail(30))
		}
		_ = leader.stop(syscall.SIGTERM)
	})
}

// waitDD waits for a DisaggDeployment to exist and returns it.
func (e *env) waitDD(t *testing.T, ctx context.Context, name string) *unstructured.Unstructured {
	t.Helper()
	var dd *unstructured.Unstructured
	eventually(t, 30*time.Second, "DisaggDeployment "+name, func() (bool, string) {
		var err error
		dd, err = e.dyn.Resource(ddGVR).Namespace(e.ns).Get(ctx, name, metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
	return dd
}

// waitReady waits for Ready=True at the current generation, every worker and frontend pod of
// the deployment Running and Ready with an IP, their count equal to the workloads' replicas.
func (e *env) waitReady(t *testing.T, ctx context.Context, name string, timeout time.Duration) *unstructured.Unstructured {
	t.Helper()
	var dd *unstructured.Unstructured
	eventually(t, timeout, name+" Ready", func() (bool, string) {
		var err error
		dd, err = e.dyn.Resource(ddGVR).Namespace(e.ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		gen := dd.GetGeneration()
		observed, _, _ := unstructured.NestedInt64(dd.Object, "status", "observedGeneration")
		status, reason, msg, condGen := condition(dd, "Ready")
		if status != "True" || observed != gen || condGen != gen {
			return false, fmt.Sprintf("Ready=%s (%s: %s), generation %d, observedGeneration %d, condition's %d%s",
				status, reason, msg, gen, observed, condGen, e.podDiagnosis(ctx, name))
		}
		want := int32(0)
		sel := "tandem.dev/deployment=" + name
		stss, err := e.kube.AppsV1().StatefulSets(e.ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil {
			return false, err.Error()
		}
		for _, s := range stss.Items {
			want += *s.Spec.Replicas
		}
		deps, err := e.kube.AppsV1().Deployments(e.ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil {
			return false, err.Error()
		}
		for _, d := range deps.Items {
			want += *d.Spec.Replicas
		}
		pods, err := e.kube.CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil {
			return false, err.Error()
		}
		ready := int32(0)
		for _, p := range pods.Items {
			if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" && podReady(&p) {
				ready++
			}
		}
		return ready == want && int32(len(pods.Items)) == want,
			fmt.Sprintf("%d/%d pods Ready (%d exist)", ready, want, len(pods.Items))
	})
	return dd
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podDiagnosis explains why pods of a deployment are missing: warning Events of its
// workloads (a Pod Security rejection shows up here) and pod phases.
func (e *env) podDiagnosis(ctx context.Context, name string) string {
	var b strings.Builder
	evs, err := e.kube.CoreV1().Events(e.ns).List(ctx, metav1.ListOptions{FieldSelector: "type=Warning"})
	if err == nil {
		for _, ev := range evs.Items {
			if strings.HasPrefix(ev.InvolvedObject.Name, name) {
				fmt.Fprintf(&b, "\n    event %s/%s %s: %s", ev.InvolvedObject.Kind, ev.InvolvedObject.Name, ev.Reason, ev.Message)
			}
		}
	}
	pods, err := e.kube.CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{LabelSelector: "tandem.dev/deployment=" + name})
	if err == nil {
		for _, p := range pods.Items {
			fmt.Fprintf(&b, "\n    pod %s %s node=%q ip=%q ready=%v", p.Name, p.Status.Phase, p.Spec.NodeName, p.Status.PodIP, podReady(&p))
		}
	}
	return b.String()
}

// deleteAndExpectRecreated deletes a StatefulSet and a Service of the flagship example and
// waits for the operator to recreate both (new uid, same spec) and for it to be Ready again.
func (e *env) deleteAndExpectRecreated(t *testing.T, ctx context.Context, op *operatorProc) {
	t.Helper()
	name := "llama-disagg-router"
	sts, err := e.kube.AppsV1().StatefulSets(e.ns).Get(ctx, name+"-prefill", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := e.kube.CoreV1().Services(e.ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	bg := metav1.DeletePropagationBackground
	if err := e.kube.AppsV1().StatefulSets(e.ns).Delete(ctx, sts.Name, metav1.DeleteOptions{PropagationPolicy: &bg}); err != nil {
		t.Fatal(err)
	}
	if err := e.kube.CoreV1().Services(e.ns).Delete(ctx, svc.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "operator "+op.holder+" recreates the prefill StatefulSet and API Service", func() (bool, string) {
		s, err1 := e.kube.AppsV1().StatefulSets(e.ns).Get(ctx, sts.Name, metav1.GetOptions{})
		v, err2 := e.kube.CoreV1().Services(e.ns).Get(ctx, svc.Name, metav1.GetOptions{})
		if err1 != nil || err2 != nil {
			return false, fmt.Sprintf("statefulset: %v; service: %v", err1, err2)
		}
		if s.UID == sts.UID || v.UID == svc.UID {
			return false, "old objects still there"
		}
		return true, ""
	})
	s, _ := e.kube.AppsV1().StatefulSets(e.ns).Get(ctx, sts.Name, metav1.GetOptions{})
	if got, want := s.Spec.Template.Spec.Containers[0].Args, sts.Spec.Template.Spec.Containers[0].Args; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("recreated StatefulSet runs %v, was %v", got, want)
	}
	e.waitReady(t, ctx, name, 2*time.Minute)
}

// invalidObjectsRejected sends objects that break the CRD's schema or CEL rules and checks
// that the API server refuses each with a message naming the offending field.
func (e *env) invalidObjectsRejected(t *testing.T) {
	t.Helper()
	valid := `apiVersion: tandem.dev/v1alpha1
kind: DisaggDeployment
metadata: {name: invalid-example}
spec:
  model: {name: m, source: "pvc://models/m"}
  image: example.com/tandem:1
  decode: {replicas: 1}
`
	cases := []struct {
		name, doc  string
		wantFields []string
	}{
		{"autoscaling min > max", valid + `  prefill: {replicas: 1}
  autoscaling:
    enabled: true
    prometheusUrl: http://prometheus:9090
    slo: {ttftP90Ms: 500, itlP90Ms: 50}
    decode: {minReplicas: 5, maxReplicas: 2}
`, []string{"spec.autoscaling.decode", "minReplicas must not exceed maxReplicas"}},
		{"kvTransfer not in the enum", valid + `  prefill: {replicas: 1}
  disaggregation: {kvTransfer: rdma}
`, []string{"spec.disaggregation.kvTransfer", `Unsupported value: "rdma"`}},
		{"model source scheme", strings.Replace(valid, "pvc://models/m", "s3://bucket/m", 1),
			[]string{"spec.model.source", "model.source must be hf://"}},
		{"hf revision with a space", strings.Replace(valid, "pvc://models/m", "hf://org/repo@v 1", 1),
			[]string{"spec.model.source", "model.source must be hf://"}},
		{"negative replicas", strings.Replace(valid, "decode: {replicas: 1}", "decode: {replicas: -1}", 1),
			[]string{"spec.decode.replicas", "replicas must not be negative"}},
		{"hfTokenSecretRef on a pvc:// source", strings.Replace(valid, `source: "pvc://models/m"}`,
			`source: "pvc://models/m", hfTokenSecretRef: {name: hf-token}}`, 1),
			[]string{"spec.model", "hfTokenSecretRef only applies to hf:// sources"}},
	}
	for _, c := range cases {
		out, err := e.kubectlStdin(c.doc, "create", "--dry-run=server", "-f", "-")
		if err == nil {
			t.Errorf("%s: accepted by the API server:\n%s", c.name, out)
			continue
		}
		for _, want := range c.wantFields {
			if !strings.Contains(out, want) {
				t.Errorf("%s: rejection does not mention %q:\n%s", c.name, want, out)
			}
		}
	}
	// A pinned hf:// revision (commit, tag, or a branch with slashes) is a valid source.
	for _, source := range []string{"hf://org/repo@0e9e39f249a16976918f6564b8830bc894c89659", "hf://org/repo@refs/pr/1"} {
		doc := strings.Replace(valid, "pvc://models/m", source, 1)
		if out, err := e.kubectlStdin(doc, "create", "--dry-run=server", "-f", "-"); err != nil {
			t.Errorf("source %s refused by the API server:\n%s", source, out)
		}
	}
	// Immutable fields: the live flagship example may not switch models.
	patch := `{"spec":{"model":{"source":"pvc://models/another-model"}}}`
	out, err := e.cmd(e.kubectl, "patch", "dd", "llama-disagg-router", "--type=merge", "-p", patch, "--dry-run=server")
	if err == nil {
		t.Errorf("changing model.source was accepted:\n%s", out)
	} else if !strings.Contains(out, "spec.model.source") || !strings.Contains(out, "immutable") {
		t.Errorf("model.source change rejected without naming the field:\n%s", out)
	}
	// Nothing got in.
	_, err = e.dyn.Resource(ddGVR).Namespace(e.ns).Get(context.Background(), "invalid-example", metav1.GetOptions{})
	if !apierrors.IsNotFound(err) {
		t.Errorf("invalid-example exists after dry runs: %v", err)
	}
}

func (e *env) kubectlStdin(stdin string, args ...string) (string, error) {
	c := exec.Command(e.kubectl, args...)
	c.Env = append(os.Environ(), "KUBECONFIG="+e.nsConfig)
	c.Stdin = strings.NewReader(stdin)
	out, err := c.CombinedOutput()
	return string(out), err
}
