% rebase('layout', title=title)
<table class="card">
% for key, value in document.items():
  <tr><th>{{key}}</th><td>{{', '.join(value) if isinstance(value, list) else value}}</td></tr>
% end
</table>
