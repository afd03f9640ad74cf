{{/* Common labels. */}}
{{- define "edgeloom.labels" -}}
app.kubernetes.io/part-of: edgeloom
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "edgeloom.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The agent's ServiceAccount as the API server names its user. */}}
{{- define "edgeloom.agentUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:edgeloom-agent
{{- end -}}
